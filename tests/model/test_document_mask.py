"""Packed rows (`document_ids`): each document sees only itself, exactly as if run alone."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from h64lm.model.mask import attention_bias, document_positions

ENCODINGS = ["rope", "alibi", "rope+alibi"]
# (encoding, sliding window, kv heads): MHA and GQA, with and without a window shorter than a doc
CASES = [(e, w, kv) for e, w, kv in itertools.product(ENCODINGS, [None, 3], [4, 2])]
# two rows of 16 slots: docs of 5 and 7 then 4 padding slots (their own document), docs of 10 and 6
LAYOUT = [[5, 7, 4], [10, 6]]


def _pack(docs):
    """docs: list of rows, each a list of [n] id tensors -> input_ids, document_ids [B, T]."""
    ids = torch.stack([torch.cat(row) for row in docs])
    doc = torch.stack([torch.cat([torch.full((len(d),), k) for k, d in enumerate(row)])
                       for row in docs])
    return ids, doc


def _per_token_ce(logits, ids):
    """logits [B, T, V], ids [B, T] -> [B, T - 1] loss of predicting ids[:, t + 1] at t."""
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                           reduction="none").view(ids.shape[0], -1)


def test_document_positions_restart_at_each_change():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2], [5, 5, 5, 5, 5, 5]])
    assert document_positions(doc).tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


def test_bias_is_block_diagonal_causal_and_windowed():
    doc = torch.tensor([[0, 0, 0, 1, 1, 1, 1]])
    slots = torch.arange(7)
    bias = attention_bias(slots, slots, None, 2, None, torch.float16, doc)[0, 0]  # [T, T]
    allowed = bias == 0
    for i, j in itertools.product(range(7), range(7)):
        expected = j <= i and i - j < 2 and doc[0, i] == doc[0, j]
        assert bool(allowed[i, j]) == expected, (i, j)
    # masked entries stay finite in fp16 (no -1e9 overflowing to -inf)
    assert torch.isfinite(bias).all() and bias.min() == torch.finfo(torch.float16).min


@pytest.mark.parametrize("encoding,window,kv_heads", CASES)
def test_packed_losses_and_gradients_equal_each_document_alone(small_model, encoding, window,
                                                               kv_heads):
    model = small_model(position_encoding=encoding, sliding_window=window,
                        num_kv_heads=kv_heads).float()
    torch.manual_seed(1)
    docs = [[torch.randint(0, model.config.vocab_size, (n,)) for n in row] for row in LAYOUT]
    ids, doc = _pack(docs)

    packed = _per_token_ce(model(ids, document_ids=doc).logits, ids)  # [B, T - 1]
    within = doc[:, 1:] == doc[:, :-1]  # targets inside a document (no cross-boundary target)
    packed[within].sum().backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    alone_total = 0.0
    for b, row in enumerate(docs):
        start = 0
        for d in row:
            alone = _per_token_ce(model(d[None]).logits, d[None])[0]  # [n - 1]
            got = packed[b, start:start + len(d) - 1]
            assert torch.allclose(got, alone, atol=1e-5, rtol=1e-5), (b, start)
            alone_total = alone_total + alone.sum()
            start += len(d)
    alone_total.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4), name


@torch.no_grad()
def test_one_document_per_row_equals_plain_causal(small_model):
    for encoding in ENCODINGS:
        model = small_model(position_encoding=encoding, sliding_window=5)
        ids = torch.randint(0, model.config.vocab_size, (2, 12))
        plain = model(ids).logits
        packed = model(ids, document_ids=torch.zeros_like(ids)).logits
        assert torch.allclose(plain, packed, atol=1e-5)


@torch.no_grad()
def test_a_single_slot_document_gives_finite_output(small_model):
    model = small_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    doc = torch.tensor([[0, 1, 2, 3, 4, 5]])  # every slot its own document (e.g. padding)
    assert torch.isfinite(model(ids, document_ids=doc).logits).all()


def test_document_ids_refuse_a_cache_or_a_wrong_shape(small_model):
    model = small_model()
    ids = torch.randint(0, model.config.vocab_size, (1, 6))
    with pytest.raises(ValueError, match="use_cache"):
        model(ids, document_ids=torch.zeros_like(ids), use_cache=True)
    with pytest.raises(ValueError, match="shape"):
        model(ids, document_ids=torch.zeros(1, 5, dtype=torch.long))
