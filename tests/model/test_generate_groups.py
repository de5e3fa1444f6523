"""G completions per prompt (shared prefill, preallocated cache) against references without them."""

import pytest
import torch

from h64lm.model import left_pad

PROMPTS = [[5, 9, 13, 2, 7, 1], [44], [3, 8, 60]]


@torch.no_grad()
def _greedy_without_cache(model, ids, mask, new_tokens, penalty=1.0):
    """The reference: every step re-runs the whole sequence, no cache, no shared prefill; the
    repetition penalty written out per row and token."""
    for _ in range(new_tokens):
        logits = model(ids, attention_mask=mask).logits[:, -1].float()
        for row in range(ids.shape[0]):
            for tok in set(ids[row][mask[row].bool()].tolist()):
                z = logits[row, tok]
                logits[row, tok] = z / penalty if z > 0 else z * penalty
        ids = torch.cat((ids, logits.argmax(-1, keepdim=True)), dim=1)
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
    return ids


@pytest.mark.parametrize("encoding,window,penalty", [("rope", None, 1.0), ("rope", None, 1.3),
                                                     ("alibi", 3, 1.0), ("rope+alibi", 5, 1.3)])
def test_greedy_groups_equal_recomputing_everything(small_model, encoding, window, penalty):
    model = small_model(position_encoding=encoding, sliding_window=window)
    ids, mask = left_pad(PROMPTS)
    G = 3
    got = model.generate(ids, 7, temperature=0, attention_mask=mask, num_return_sequences=G,
                         repetition_penalty=penalty)
    expected = _greedy_without_cache(model, ids, mask, 7, penalty)
    assert got.shape == (len(PROMPTS) * G, ids.shape[1] + 7)
    assert torch.equal(got, expected.repeat_interleave(G, dim=0))


@pytest.mark.parametrize("window", [None, 4])
def test_shared_prefill_samples_as_repeated_prompts_do(small_model, window):
    """Same generator seed: G completions from one prefill == the prompts repeated G times."""
    model = small_model(sliding_window=window)
    ids, mask = left_pad(PROMPTS)
    sampling = dict(temperature=1.0, top_k=30, top_p=0.95)
    shared = model.generate(ids, 9, attention_mask=mask, num_return_sequences=4,
                            generator=torch.Generator().manual_seed(3), **sampling)
    repeated = model.generate(ids.repeat_interleave(4, 0), 9, attention_mask=mask.repeat_interleave(4, 0),
                              generator=torch.Generator().manual_seed(3), **sampling)
    assert torch.equal(shared, repeated)
    completions = shared[:, ids.shape[1]:]
    assert len({tuple(row) for row in completions.tolist()}) > len(PROMPTS)  # G rows differ


def test_rows_of_a_group_stop_at_their_own_eos(small_model):
    model = small_model()
    ids = torch.tensor([[4, 8, 15]])
    free = model.generate(ids, 12, temperature=1.0, num_return_sequences=6,
                          generator=torch.Generator().manual_seed(0))
    eos = free[0, 5].item()  # the token row 0 samples third
    stopped = model.generate(ids, 12, temperature=1.0, num_return_sequences=6, eos_token_id=eos,
                             pad_token_id=-1, generator=torch.Generator().manual_seed(0))
    for row, full in zip(stopped.tolist(), free.tolist()):
        new = row[3:]
        if eos in new:
            cut = new.index(eos) + 1
            assert new[:cut] == full[3:3 + cut] and all(t == -1 for t in new[cut:])
        else:
            assert new == full[3:3 + len(new)]
    # generation ends when the last row to reach EOS does (or at 12 tokens)
    ends = [row[3:].index(eos) + 1 if eos in row[3:] else 12 for row in free.tolist()]
    assert stopped.shape[1] == 3 + max(ends)


def test_num_return_sequences_must_be_positive(small_model):
    with pytest.raises(ValueError, match="num_return_sequences=0"):
        small_model().generate(torch.tensor([[1, 2]]), 3, num_return_sequences=0)
