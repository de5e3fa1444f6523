import numpy as np
import pytest
import torch

from h64lm.data import Batch, Loader, TokenLoader, validation_windows

SEQ = 8


@pytest.fixture
def tokens():
    # Token i has value i, so a window's content tells where it starts. [N]
    return np.arange(SEQ * 50 + 1, dtype=np.uint32)


def test_windows_and_labels(tokens):
    loader = TokenLoader(tokens, SEQ, batch_size=4, seed=0)
    x, y = loader.batch(0)
    assert x.shape == y.shape == (4, SEQ) and x.dtype == y.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:])  # labels are the inputs shifted by one
    starts = x[:, 0]
    assert torch.all(starts % SEQ == 0)  # windows start on the stride
    expected = starts[:, None] + torch.arange(SEQ)  # contiguous text
    assert torch.equal(x, expected) and torch.equal(y, expected + 1)


def test_pure_function_of_seed_index_rank(tokens):
    a = TokenLoader(tokens, SEQ, batch_size=4, seed=3)
    b = TokenLoader(tokens, SEQ, batch_size=4, seed=3)
    order = [7, 0, 30, 7, 2, 13]
    for index in order:
        assert torch.equal(a.batch(index)[0], b.batch(index)[0])
    assert not torch.equal(a.batch(0)[0], TokenLoader(tokens, SEQ, 4, seed=4).batch(0)[0])


def test_epoch_visits_each_window_once_in_random_order(tokens):
    loader = TokenLoader(tokens, SEQ, batch_size=5, seed=0)  # 50 windows, 10 batches per epoch
    seen = np.concatenate([loader.window_ids(i) for i in range(10)])
    assert sorted(seen.tolist()) == list(range(50))
    assert seen.tolist() != list(range(50))
    next_epoch = np.concatenate([loader.window_ids(i) for i in range(10, 20)])
    assert sorted(next_epoch.tolist()) == list(range(50)) and not np.array_equal(seen, next_epoch)


def test_ranks_disjoint_and_cover_the_global_batch(tokens):
    world = 3
    ranks = [TokenLoader(tokens, SEQ, batch_size=4, seed=1, rank=r, world_size=world)
             for r in range(world)]
    single = TokenLoader(tokens, SEQ, batch_size=4 * world, seed=1)
    for index in (0, 1, 3, 4, 9):  # 50 windows // 12 = 4 batches per epoch: crosses an epoch
        ids = [set(r.window_ids(index).tolist()) for r in ranks]
        assert all(len(s) == 4 for s in ids)
        assert len(set.union(*ids)) == 4 * world  # no window read twice at this index
        assert set.union(*ids) == set(single.window_ids(index).tolist())


def test_exact_resume(tokens):
    run = TokenLoader(tokens, SEQ, batch_size=4, seed=5)
    uninterrupted = [run.next_batch() for _ in range(25)]  # 12 batches per epoch: 2+ epochs
    first = TokenLoader(tokens, SEQ, batch_size=4, seed=5)
    for _ in range(9):
        first.next_batch()
    state = first.state_dict()
    assert all(isinstance(v, int) for v in state.values())
    resumed = TokenLoader(tokens, SEQ, batch_size=4, seed=999)
    resumed.load_state_dict(state)
    for want in uninterrupted[9:]:
        got = resumed.next_batch()
        assert torch.equal(got.input_ids, want.input_ids) and torch.equal(got.labels, want.labels)


def test_resume_with_other_world_size_same_global_batch(tokens):
    one = TokenLoader(tokens, SEQ, batch_size=4, seed=2)
    one.index = 7
    halves = [TokenLoader(tokens, SEQ, batch_size=2, seed=0, rank=r, world_size=2) for r in (0, 1)]
    for h in halves:
        h.load_state_dict(one.state_dict())
    both = torch.cat([h.next_batch().input_ids for h in halves])
    assert torch.equal(both, one.next_batch().input_ids)


def test_next_batch_is_a_batch_of_shifted_tokens(tokens):
    loader = TokenLoader(tokens, SEQ, batch_size=4, seed=1)
    assert isinstance(loader, Loader)
    batch = loader.next_batch()
    assert isinstance(batch, Batch) and batch.document_ids is None
    assert torch.equal(batch.input_ids[:, 1:], batch.labels[:, :-1])  # labels = inputs shifted by one
    assert batch.num_targets() == batch.labels.numel()


@pytest.mark.parametrize("change, match", [
    ({"seq_len": SEQ * 2}, "seq_len was 8, now 16"),
    ({"batch_size": 3}, "global batch was 4 x 1"),
])
def test_resume_rejects_changed_shape(tokens, change, match):
    state = TokenLoader(tokens, SEQ, batch_size=4, seed=0).state_dict()
    args = {"seq_len": SEQ, "batch_size": 4} | change
    with pytest.raises(ValueError, match=match):
        TokenLoader(tokens, args["seq_len"], args["batch_size"], seed=0).load_state_dict(state)


def test_resume_rejects_changed_corpus(tokens):
    state = TokenLoader(tokens, SEQ, batch_size=4, seed=0).state_dict()
    with pytest.raises(ValueError, match="num_tokens was 401, now 400"):
        TokenLoader(tokens[:-1], SEQ, batch_size=4, seed=0).load_state_dict(state)


def test_corpus_smaller_than_a_global_batch(tokens):
    with pytest.raises(ValueError, match=r"data.seq_len=8: .*50 windows.*train.batch_size=32"):
        TokenLoader(tokens, SEQ, batch_size=32, seed=0, world_size=2)


def test_bad_arguments(tokens):
    with pytest.raises(ValueError, match="rank=2 must be in"):
        TokenLoader(tokens, SEQ, 2, seed=0, rank=2, world_size=2)
    with pytest.raises(ValueError, match="train.seed=-1"):
        TokenLoader(tokens, SEQ, 2, seed=-1)


def test_validation_windows_fixed_and_evenly_spaced(tokens):
    all_windows = validation_windows(tokens, SEQ)
    assert all_windows.shape == (50, SEQ + 1) and all_windows.dtype == torch.int64
    assert torch.equal(all_windows[:, 0], torch.arange(50) * SEQ)
    some = validation_windows(tokens, SEQ, max_windows=5)
    assert torch.equal(some[:, 0] // SEQ, torch.tensor([0, 12, 24, 37, 49]))  # linspace(0, 49, 5)
    assert torch.equal(some, validation_windows(tokens, SEQ, max_windows=5))
    assert validation_windows(tokens, SEQ, max_windows=500).shape[0] == 50


def test_validation_split_shorter_than_a_window():
    with pytest.raises(ValueError, match=r"data.seq_len=8: the validation split has 5 tokens"):
        validation_windows(np.arange(5), SEQ)
