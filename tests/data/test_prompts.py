"""The RL stage's prompt loader: the same micro-batches whatever the split between ranks and
micro-batches, every prompt once per epoch, exact resume."""

import torch

from h64lm.data.batch import IGNORE_INDEX
from h64lm.data.prompts import Prompt, PromptLoader

PROMPTS = [Prompt(tuple(range(1, 2 + i % 5)), str(i)) for i in range(10)]  # lengths 1..5


def _loader(**kw):
    args = dict(batch_size=2, micro_batches=1, seed=7, rank=0, world_size=1, pad_id=0)
    return PromptLoader(PROMPTS, **{**args, **kw})


def test_two_ranks_take_the_micro_batches_one_rank_takes_in_a_step():
    one = _loader(micro_batches=2)
    ranks = [_loader(rank=r, world_size=2) for r in range(2)]
    for _ in range(7):  # several steps, across the epoch boundary (10 prompts, 4 per step)
        for r in range(2):
            a, b = one.next_batch(), ranks[r].next_batch()
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.extras["position"], b.extras["position"])


def test_every_prompt_once_per_epoch_left_padded_without_targets():
    loader = _loader()
    seen = []
    for _ in range(5):
        batch = loader.next_batch()
        assert (batch.labels == IGNORE_INDEX).all()
        mask = batch.extras["attention_mask"]
        for row, index in enumerate(batch.extras["prompt"].tolist()):
            ids = PROMPTS[index].ids
            assert batch.input_ids[row, -len(ids):].tolist() == list(ids)  # ends at the last column
            assert mask[row].sum() == len(ids) and mask[row, -len(ids):].all()
            seen.append(index)
    assert sorted(seen) == list(range(10))
    assert seen != list(range(10))  # shuffled
    second = [i for _ in range(5) for i in loader.next_batch().extras["prompt"].tolist()]
    assert sorted(second) == list(range(10)) and second != seen  # a new order each epoch


def test_resume_yields_exactly_the_next_batches():
    a = _loader()
    for _ in range(3):
        a.next_batch()
    b = _loader()
    b.load_state_dict(a.state_dict())
    for _ in range(6):
        x, y = a.next_batch(), b.next_batch()
        assert torch.equal(x.input_ids, y.input_ids) and torch.equal(x.extras["prompt"], y.extras["prompt"])
