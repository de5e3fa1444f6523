"""Text samples from fixed prompts (the validation loss: h64lm/eval/validation.py)."""

from __future__ import annotations

import torch
from torch import nn

from h64lm.model import left_pad

__all__ = ["sample_continuations"]


@torch.no_grad()
def sample_continuations(
    model: nn.Module,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int,
    device: torch.device,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float = 1.0,
    seed: int = 0,
) -> list[str]:
    """Continue each prompt (batched, left-padded); returns each prompt with its continuation.

    Prompt and continuation are decoded together: decoding them apart would drop the space that
    sentencepiece's word-start marker stands for ("Hello" + "the" -> "Hellothe"). An empty prompt
    generates from BOS alone."""
    was_training = model.training
    model.eval()
    encoded = [tokenizer.encode(p, bos=True) for p in prompts]
    input_ids, attention_mask = left_pad(encoded, pad_token_id=tokenizer.pad_id)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(
        input_ids.to(device),
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        eos_token_id=tokenizer.eos_id,
        pad_token_id=tokenizer.pad_id,
        attention_mask=attention_mask.to(device),
        generator=generator,
    )
    model.train(was_training)
    texts = []
    for prompt_ids, row in zip(encoded, out[:, input_ids.shape[1] :].tolist()):
        if tokenizer.eos_id in row:
            row = row[: row.index(tokenizer.eos_id)]
        texts.append(tokenizer.decode(prompt_ids[1:] + row))  # [1:]: without BOS
    return texts
