"""The CPU expert-threads path (h64lm/model/moe/cpu_grouped.py) against the per-expert loop."""

import threading

import pytest
import torch

from h64lm.model.moe import cpu_grouped
from h64lm.model.moe import experts as experts_module
from h64lm.model.moe.cpu_grouped import threaded_grouped_mm


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _case(counts: list[int], a: int = 24, b: int = 40, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(counts), a, generator=g).to(dtype).requires_grad_()
    w = torch.randn(len(counts), a, b, generator=g).to(dtype).requires_grad_()
    dy = torch.randn(sum(counts), b, generator=g).to(dtype)
    offsets = torch.tensor(counts).cumsum(0).to(torch.int32)
    return x, w, dy, offsets


def _loop_on_one_thread(x, w, dy, counts):
    """The reference: one product per expert with rows, on one thread, and autograd's gradients."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
        y = torch.cat([x_e @ w_e for x_e, w_e in zip(xr.split(counts), wr.unbind(0))])
        y.backward(dy)
    finally:
        torch.set_num_threads(before)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("threads", [2, 3])
@pytest.mark.parametrize("counts", [[5, 0, 17, 3, 0, 40, 1, 6], [0, 0, 9], [64] * 16, [1] * 5],
                         ids=["uneven_with_empty", "fewer_experts_with_rows", "equal", "one_row_each"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_equals_the_per_expert_loop_bit_for_bit(two_threads, threads, counts, dtype):
    x, w, dy, offsets = _case(counts, dtype=dtype)
    y_ref, dx_ref, dw_ref = _loop_on_one_thread(x, w, dy, counts)
    y = threaded_grouped_mm(x, w, offsets, threads)
    y.backward(dy)
    assert torch.equal(y, y_ref)
    assert torch.equal(x.grad, dx_ref)
    assert torch.equal(w.grad, dw_ref)  # experts without rows: exactly zero
    assert not w.grad[[i for i, n in enumerate(counts) if n == 0]].any()


def test_thread_counts_are_kept(two_threads):
    """The workers' one-thread setting stays theirs: the caller, and a thread that starts computing
    afterwards (torch hands it the last count any thread set), still get 2."""
    x, w, dy, offsets = _case([30, 2, 0, 50])
    threaded_grouped_mm(x, w, offsets, 2).backward(dy)
    seen = []
    later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
    later.start()
    later.join()
    assert torch.get_num_threads() == 2 and seen == [2]


def test_a_failing_product_raises_and_keeps_the_thread_count(two_threads):
    x, w, _, offsets = _case([3, 4])
    with torch.no_grad(), pytest.raises(RuntimeError):
        threaded_grouped_mm(x, w[:, :5], offsets, 2)  # inner sizes 24 vs 5
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize("counts, parts", [([10, 0, 10, 0, 10, 10], 2), ([1] * 64, 2), ([100, 1, 1], 2),
                                           ([0, 0, 0, 7], 3), ([5, 5], 4)])
def test_ranges_cover_every_expert_once_in_order(counts, parts):
    bounds = [0, *torch.tensor(counts).cumsum(0).tolist()]
    ranges = cpu_grouped._ranges(bounds, parts)
    assert [e for lo, hi in ranges for e in range(lo, hi)] == list(range(len(counts)))
    assert len(ranges) <= parts
    if counts == [1] * 64:
        assert ranges == [(0, 32), (32, 64)]  # equal rows: equal halves


def test_grouped_matmul_picks_threads_for_many_small_products_only(two_threads, monkeypatch):
    calls = []
    monkeypatch.setattr(experts_module, "threaded_grouped_mm",
                        lambda *a: calls.append(a[0].shape[0]) or threaded_grouped_mm(*a))
    for rows, experts in [(4096, 64), (4096, 8), (128, 64)]:  # 64 rows each; 512 each; a decode step
        x = torch.randn(rows, 16)
        w = torch.randn(experts, 16, 8)
        offsets = torch.full((experts,), rows // experts).cumsum(0).to(torch.int32)
        y = experts_module.grouped_matmul(x, w, offsets)
        assert torch.allclose(y, experts_module.loop_matmul(x, w, offsets), rtol=1e-5, atol=1e-5)
    assert calls == [4096]
    torch.set_num_threads(1)
    experts_module.grouped_matmul(torch.randn(4096, 16), torch.randn(64, 16, 8),
                                  torch.full((64,), 64).cumsum(0).to(torch.int32))
    assert calls == [4096]  # one thread: nothing to split
