"""Rollouts of the RL stage: G sampled completions per prompt, as training batches.

A prompt micro-batch (h64lm/data/prompts.py: B left-padded prompts of width L) becomes R = B * G
rows through the KV-cache generator (one prefill per prompt, rows b*G .. b*G + G - 1 continue
prompt b). Each row is prompt + completion; the completion's tokens through its first EOS are
the sampled actions (`completion_mask`), the columns after it are padding.

As a training `Batch` (S = L + n - 1 for n completion columns):
    input_ids [R, S]   prompt + completion without its last column
    labels    [R, S]   the next token where it is a counted completion token, else -100 (the
                       prompt, the left padding and the pads after the EOS have no target)
    extras["attention_mask"] [R, S]  0 on the prompt's left padding
    real_tokens [R]  input positions that are neither left padding nor after the first EOS
So `labels != -100` marks exactly the sampled actions, and a per-token quantity of the forward
(log-prob, value) at position p belongs to the action labels[:, p].

Truncated sampling (top_k, top_p) changes which tokens can be drawn, not what a rollout records:
the objective's log-probs of the sampled tokens (ratio, KL) are always the policy's over the whole
vocabulary, as TRL and OpenRLHF compute them.

Determinism: sampling draws from a generator seeded with (seed, the global stream position of
the micro-batch's first prompt), so a resumed run, or the same micro-batch on another rank, samples
the same completions. `fixed_length` decodes all max_new_tokens steps instead of stopping when
every row has ended: under sharded weights each forward is a collective, and ranks whose rows end
at different steps would otherwise run different numbers of them. Completions are cut to the last
column any row needs either way, so both settings give the same tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from h64lm.data.batch import IGNORE_INDEX, Batch
from h64lm.model.generate import generate
from h64lm.objectives.policy import completion_mask

__all__ = ["Rollout", "sample_rollout", "sampling_seed"]


@dataclass
class Rollout:
    batch: Batch  # the rows to train on (see the module docstring)
    sequences: torch.Tensor  # [R, L + n] prompt + completion, whole (a reward model reads these)
    attention: torch.Tensor  # [R, L + n] 0 on the prompt's left padding
    completions: torch.Tensor  # [R, n] sampled tokens, EOS-padded after each row's first EOS
    mask: torch.Tensor  # [R, n] bool: the counted completion tokens (through the first EOS)
    prompt_rows: torch.Tensor  # [R] the prompt micro-batch row each rollout row continues

    def last_tokens(self) -> torch.Tensor:
        """[R] the column of each row's last real token in `sequences` (its EOS when it has one):
        where a reward model's score is read."""
        return self.sequences.shape[1] - self.completions.shape[1] + self.mask.sum(1) - 1


def sampling_seed(seed: int, position: int) -> int:
    """One 63-bit seed per (run seed, global prompt position): distinct micro-batches never share
    a stream, and the same micro-batch always gets the same one."""
    return (seed * 0x9E3779B97F4A7C15 + position) % (1 << 63)


@torch.no_grad()
def sample_rollout(model: nn.Module, prompts: Batch, group_size: int, max_new_tokens: int,
                   temperature: float, eos_id: int, seed: int, fixed_length: bool = False,
                   top_k: int = 0, top_p: float = 1.0) -> Rollout:
    """prompts: input_ids [B, L] with extras attention_mask [B, L] and position [B] -> a `Rollout`
    of R = B * group_size rows. top_k = 0 and top_p = 1 sample from the whole distribution."""
    ids, prompt_mask = prompts.input_ids, prompts.extras["attention_mask"]
    device = ids.device
    generator = torch.Generator(device=device)
    generator.manual_seed(sampling_seed(seed, int(prompts.extras["position"][0])))
    G, L = group_size, ids.shape[1]
    out = generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k or None,
                   top_p=top_p if top_p < 1 else None, eos_token_id=None if fixed_length else eos_id,
                   pad_token_id=eos_id, attention_mask=prompt_mask, generator=generator, num_return_sequences=G)
    completions = out[:, L:]  # [R, n]
    mask = completion_mask(completions, eos_id)
    width = int(mask.sum(1).max())  # the last column any row needs (early stop ends there too)
    completions = completions[:, :width].masked_fill(~mask[:, :width], eos_id)
    mask = mask[:, :width]

    R = ids.shape[0] * G
    full = torch.cat([ids.repeat_interleave(G, dim=0), completions], dim=1)  # [R, L + n]
    labels = torch.full_like(full, IGNORE_INDEX)
    labels[:, L:] = completions.masked_fill(~mask, IGNORE_INDEX)
    attention = torch.cat([prompt_mask.repeat_interleave(G, dim=0),
                           torch.ones(R, width, dtype=prompt_mask.dtype, device=device)], dim=1)
    # real inputs: the prompt's unpadded tokens and the completion through its first EOS
    real = torch.cat([prompt_mask.repeat_interleave(G, dim=0).bool(), mask], dim=1)  # [R, L + n]
    batch = Batch(full[:, :-1], labels[:, 1:], extras={"attention_mask": attention[:, :-1]},
                  real_tokens=real[:, :-1].sum(1))
    rows = torch.arange(ids.shape[0], device=device).repeat_interleave(G)
    return Rollout(batch, full, attention, completions, mask, rows)
