"""Preference pairs as batches: rows, labels on the answer only, skips, order, sharding and resume."""

import pytest
import torch

from h64lm.data.batch import IGNORE_INDEX
from h64lm.data.chat import ChatFormat, Message
from h64lm.data.config import DataConfig
from h64lm.data.preference import PreferencePair, arithmetic_pairs
from h64lm.data.preference_batches import PAD_ID, PreferenceLoader, build_preference_data, encode_pairs
from h64lm.data.tasks.arithmetic import make_splits


@pytest.fixture(scope="module")
def chat():
    return ChatFormat()


def _pair(question, chosen, rejected):
    return PreferencePair(({"role": "user", "content": question},), chosen, rejected)


def test_rows_hold_prompt_plus_answer_with_labels_on_the_answer_only(chat):
    pairs = [_pair("What is 2+3?", "5", "6 or so"), _pair("Name a colour.", "Blue.", "Seven.")]
    rows = encode_pairs(chat, pairs, 64, "k", {})
    loader = PreferenceLoader(rows, rows.width(), batch_size=2, seed=0)
    batch = loader.next_batch()
    assert batch.input_ids.shape == (4, rows.width())
    real = 0
    for r in range(4):
        i = int(batch.extras["pair"][r])
        which = "chosen" if r % 2 == 0 else "rejected"
        # independent reference: mistral-common's own encodings of the prompt and of the whole chat
        prompt = chat.prompt([Message("user", pairs[i].prompt[0]["content"])])
        full = chat.encode([Message(m["role"], m["content"]) for m in pairs[i].conversation(which)]).tokens
        n = len(full)
        assert batch.input_ids[r, :n].tolist() == full and full[-1] == chat.eos_id
        assert (batch.input_ids[r, n:] == PAD_ID).all()
        assert int(batch.extras["last"][r]) == n - 1
        real += n
        targets = [(t, int(lab)) for t, lab in enumerate(batch.labels[r]) if lab != IGNORE_INDEX]
        # position t predicts token t + 1: exactly the answer's tokens after the prompt, </s> last
        assert [t + 1 for t, _ in targets] == list(range(len(prompt), n))
        assert [lab for _, lab in targets] == full[len(prompt):]
    assert batch.extras["pair"].tolist()[0::2] == batch.extras["pair"].tolist()[1::2]
    assert batch.num_inputs() == real < batch.input_ids.numel()  # each whole conversation, no padding


def test_too_long_and_malformed_pairs_are_skipped_and_counted(chat):
    long = _pair("q " * 80, "a", "b")
    bad = PreferencePair(({"role": "user", "content": "hi"}, {"role": "user", "content": "again"}), "a", "b")
    good = _pair("What is 1+1?", "2", "3")
    skipped = {}
    rows = encode_pairs(chat, [long, good, bad], 40, "data=preference train", skipped)
    assert len(rows) == 1
    assert skipped == {"data=preference train": {"pairs": 3, "reasons": {"too_long": 1, "bad_turns": 1},
                                                 "first": 0}}
    with pytest.raises(ValueError, match=r"none of the 1 preference pairs is usable.*raise data\.seq_len=40"):
        encode_pairs(chat, [long], 40, "data=preference train", {})


def test_loader_epochs_sharding_and_exact_resume(chat):
    rows = encode_pairs(chat, arithmetic_pairs(10, seed=1), 128, "k", {})
    one = PreferenceLoader(rows, rows.width(), batch_size=4, seed=3)
    assert one.batches_in_epoch() == 2  # 10 pairs, 2 left over per epoch
    seen = [one.next_batch() for _ in range(4)]  # two epochs
    epoch0 = [i for b in seen[:2] for i in b.extras["pair"][0::2].tolist()]
    epoch1 = [i for b in seen[2:] for i in b.extras["pair"][0::2].tolist()]
    assert len(set(epoch0)) == 8 and len(set(epoch1)) == 8 and epoch0 != epoch1
    # two ranks with half the batch each see the one-rank batch's pairs, rank 0 first
    ranks = [PreferenceLoader(rows, rows.width(), batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for b in seen:
        halves = [loader.next_batch() for loader in ranks]
        assert torch.equal(torch.cat([h.input_ids for h in halves]), b.input_ids)
    # resume: the next batch after load_state_dict is the one the uninterrupted loader yields
    again = PreferenceLoader(rows, rows.width(), batch_size=4, seed=3)
    again.load_state_dict(one.state_dict())
    assert torch.equal(again.next_batch().input_ids, one.next_batch().input_ids)
    other = PreferenceLoader(encode_pairs(chat, arithmetic_pairs(10, seed=2), 128, "k", {}), rows.width(), 4, 3)
    with pytest.raises(ValueError, match=r"restore data\.\*"):
        other.load_state_dict(one.state_dict())
    with pytest.raises(ValueError, match=r"fewer than one global batch of train\.batch_size=11"):
        PreferenceLoader(rows, rows.width(), batch_size=11, seed=0)


def test_offline_pairs_come_from_the_arithmetic_tasks_train_split():
    """data=preference_arithmetic: prompts of the arithmetic task's train split (never its test split,
    which exact match scores), every validation pair once, in order."""
    loader, val_batches, skipped = build_preference_data(
        DataConfig(name="preference_arithmetic", max_samples=60, seq_len=96), batch_size=4, val_batch_size=3, seed=0)
    splits = make_splits()
    train_questions = {p.question for p in splits["train"]}
    test_questions = {p.question for p in splits["test"]}
    chat = ChatFormat()
    for b in val_batches + [loader.next_batch()]:
        for row in b.input_ids[0::2]:
            text = chat.decode([t for t in row.tolist() if t != PAD_ID])
            question = text.split("[INST]")[1].split("[/INST]")[0].strip()
            assert question in train_questions and question not in test_questions
    pairs = [i for b in val_batches for i in b.extras["pair"][0::2].tolist()]
    assert pairs == list(range(len(pairs))) and len(pairs) + len(loader.rows) == 60 and not skipped
