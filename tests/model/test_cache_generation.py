"""KV-cache decoding against the full forward pass, and batched generation."""

import itertools

import pytest
import torch

from h64lm.model import KVCache, left_pad
from h64lm.model.sampling import apply_repetition_penalty, filter_top_p, sample_categorical, select_next

ENCODINGS = ["rope", "alibi", "rope+alibi"]


@torch.no_grad()
@pytest.mark.parametrize("encoding,window", list(itertools.product(ENCODINGS, [None, 4])))
def test_incremental_decoding_matches_full_forward(small_model, encoding, window):
    model = small_model(position_encoding=encoding, sliding_window=window)
    ids = torch.randint(0, model.config.vocab_size, (2, 13))
    full = model(ids).logits
    out = model(ids[:, :5], use_cache=True)  # a prefill chunk, then one token at a time
    steps = [out.logits]
    for t in range(5, 13):
        out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
        steps.append(out.logits)
        if window is not None:
            assert out.past_key_values.keys[0].shape[2] <= window - 1
    assert (torch.cat(steps, dim=1) - full).abs().max().item() <= 1e-4


@torch.no_grad()
def test_cache_keeps_only_kv_heads(small_model):
    model = small_model()
    out = model(torch.randint(0, 97, (1, 6)), use_cache=True)
    cache: KVCache = out.past_key_values
    assert cache.keys[0].shape == (1, model.config.num_kv_heads, 6, model.config.head_dim)


@torch.no_grad()
@pytest.mark.parametrize("encoding,window", [("rope", None), ("alibi", 3), ("rope+alibi", 5)])
def test_batched_left_padded_generation_equals_each_prompt_alone(small_model, encoding, window):
    model = small_model(position_encoding=encoding, sliding_window=window)
    prompts = [[5, 9, 13, 2, 7, 1], [44], [3, 8, 60]]
    ids, mask = left_pad(prompts, pad_token_id=0)
    batched = model.generate(ids, 8, temperature=0, attention_mask=mask)
    for row, prompt in enumerate(prompts):
        alone = model.generate(torch.tensor([prompt]), 8, temperature=0)
        assert batched[row, ids.shape[1]:].tolist() == alone[0, len(prompt):].tolist()


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_token_id=9)
    assert ids.tolist() == [[1, 2, 3], [9, 9, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


@torch.no_grad()
def test_greedy_is_argmax_and_rows_stop_at_eos(small_model):
    model = small_model()
    prompt = torch.tensor([[4, 8, 15], [16, 23, 42]])
    free = model.generate(prompt, 6, temperature=0)
    logits = model(free[:, :-1]).logits
    assert torch.equal(free[:, 3:], logits[:, 2:].argmax(-1))
    eos = free[0, 4].item()  # row 0 emits this token at its second step
    stopped = model.generate(prompt, 6, temperature=0, eos_token_id=eos, pad_token_id=-1)
    row = stopped[0, 3:].tolist()
    cut = row.index(eos)
    assert all(tok == -1 for tok in row[cut + 1:])
    assert stopped[0, :3 + cut + 1].tolist() == free[0, :3 + cut + 1].tolist()


@torch.no_grad()
def test_sampling_is_reproducible_with_a_generator(small_model):
    model = small_model()
    prompt = torch.tensor([[1, 2, 3]])
    runs = [model.generate(prompt, 5, temperature=0.9, top_k=20, top_p=0.9,
                           generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])


def test_generation_past_rope_limit_is_a_clear_error(small_model):
    model = small_model(max_position_embeddings=8)
    with pytest.raises(ValueError, match="max_position_embeddings=8"):
        model.generate(torch.tensor([[1, 2, 3]]), 6)


def test_repetition_penalty_per_row_and_sign():
    logits = torch.tensor([[2.0, -2.0, 1.0], [2.0, -2.0, 1.0]])
    tokens = torch.tensor([[0, 1], [2, 2]])
    seen = torch.tensor([[True, True], [False, True]])
    out = apply_repetition_penalty(logits, tokens, seen, 2.0)
    # row 0 saw tokens 0 (positive logit: divided) and 1 (negative: multiplied); row 1 saw 2
    assert out.tolist() == [[1.0, -4.0, 1.0], [2.0, -2.0, 0.5]]


def test_top_p_filter():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    # nucleus 0.75: 0.5 then 0.3 reach it; 0.15 and 0.05 go
    assert torch.isinf(filter_top_p(logits, 0.75)).tolist() == [[False, True, False, True]]
    assert torch.isinf(filter_top_p(logits, 0.4)).tolist() == [[False, True, True, True]]


def test_inverse_cdf_sampling_follows_the_distribution():
    probs = [0.5, 0.0, 0.3, 0.2]
    n = 40_000
    logits = torch.log(torch.tensor([probs] * n))  # log 0 = -inf: never drawn
    draws = sample_categorical(logits, torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=4).double() / n
    for got, p in zip(freq.tolist(), probs):
        # 5 standard deviations of a binomial proportion
        assert abs(got - p) <= 5 * (p * (1 - p) / n) ** 0.5 + 1e-12


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]])).repeat(2000, 1)
    gen = torch.Generator().manual_seed(1)
    assert set(select_next(logits, 1.0, 2, None, gen).tolist()) == {1, 3}
    # top-3 keeps {1, 3, 2}; their nucleus at 0.75 (renormalised 0.53, 0.32, ...) keeps {1, 3}
    assert set(select_next(logits, 1.0, 3, 0.75, gen).tolist()) == {1, 3}
    assert set(select_next(logits, 1.0, None, 0.75, gen).tolist()) == {1, 3}
    assert set(select_next(logits, 1.0, None, None, gen).tolist()) == {0, 1, 2, 3}


def test_sampling_from_nan_logits_is_an_error_not_a_token():
    logits = torch.tensor([[0.0, 1.0], [float("nan"), 0.0]])
    with pytest.raises(RuntimeError, match="non-finite logits"):
        sample_categorical(logits, None)
