"""Causality, the sliding window, ALiBi, and sequences past max_position_embeddings."""

import itertools

import pytest
import torch

from h64lm.model.alibi import alibi_bias, alibi_slopes
from h64lm.model.mask import attention_bias

ENCODINGS = ["rope", "alibi", "rope+alibi"]


@torch.no_grad()
@pytest.mark.parametrize("encoding,window", list(itertools.product(ENCODINGS, [None, 3])))
def test_causal_future_tokens_do_not_change_past_logits(small_model, encoding, window):
    model = small_model(position_encoding=encoding, sliding_window=window)
    ids = torch.randint(0, model.config.vocab_size, (2, 14))
    t = 6
    changed = ids.clone()
    changed[:, t + 1:] = torch.randint(0, model.config.vocab_size, (2, 14 - t - 1))
    a, b = model(ids).logits, model(changed).logits
    assert torch.allclose(a[:, : t + 1], b[:, : t + 1], atol=1e-6)
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:], atol=1e-3)


@torch.no_grad()
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_token_beyond_window_has_exactly_no_effect(small_model, encoding):
    window = 4
    model = small_model(num_layers=1, moe_layers="none", position_encoding=encoding,
                        sliding_window=window)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    t = 10
    outside, inside = t - window, t - window + 1
    for position, should_change in ((outside, False), (inside, True)):
        changed = ids.clone()
        changed[0, position] = (ids[0, position] + 1) % model.config.vocab_size
        diff = (model(ids).logits[0, t] - model(changed).logits[0, t]).abs().max().item()
        assert (diff > 0) == should_change, (position, diff)


def test_alibi_slopes_follow_the_paper():
    assert torch.allclose(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    # 12 heads: the 8-head sequence, then the odd terms of the 16-head sequence 2^(-i/2)
    expected_12 = [2.0 ** -i for i in range(1, 9)] + [2.0 ** -(i / 2) for i in (1, 3, 5, 7)]
    assert torch.allclose(alibi_slopes(12), torch.tensor(expected_12))
    assert torch.allclose(alibi_slopes(16), torch.tensor([2.0 ** -(i / 2) for i in range(1, 17)]))


def test_alibi_bias_only_penalises_distance():
    slopes = alibi_slopes(4)
    positions = torch.arange(6)
    bias = alibi_bias(slopes, positions, positions)  # [H, T, L]
    for h, i, j in itertools.product(range(4), range(6), range(6)):
        expected = -slopes[h].item() * (i - j) if j <= i else 0.0
        assert bias[h, i, j].item() == pytest.approx(expected)
    assert (bias <= 0).all()


def test_alibi_model_applies_no_rope(small_model):
    assert small_model(position_encoding="alibi").rotary is None
    assert small_model(position_encoding="rope+alibi").rotary is not None


@torch.no_grad()
@pytest.mark.parametrize("encoding", ["alibi", "rope+alibi"])
def test_alibi_runs_past_max_positions(small_model, encoding):
    model = small_model(position_encoding=encoding, max_position_embeddings=16)
    out = model(torch.randint(0, model.config.vocab_size, (1, 40)))
    assert out.logits.shape[1] == 40 and torch.isfinite(out.logits).all()


def test_rope_past_max_positions_is_a_clear_error(small_model):
    model = small_model(position_encoding="rope", max_position_embeddings=16)
    with pytest.raises(ValueError, match="gives 17 positions, more than model.max_position_embeddings=16"):
        model(torch.randint(0, model.config.vocab_size, (1, 17)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_mask_is_finite_and_padding_rows_give_no_nan(small_model, dtype):
    slots = torch.arange(5)
    padding = torch.tensor([[False, False, True, True, True]])
    bias = attention_bias(slots, slots, padding, 2, alibi_slopes(4), dtype)
    assert torch.isfinite(bias).all()
    model = small_model(position_encoding="rope+alibi", sliding_window=3).to(dtype)
    ids = torch.randint(0, model.config.vocab_size, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    assert torch.isfinite(logits).all()
