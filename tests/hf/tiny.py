"""Tiny offline fixtures shared by tests/hf and tests/eval: a 192-id byte-level BPE tokenizer
trained on real text, and small random H64LM models."""

import functools
from pathlib import Path

import torch

from h64lm.data.wiki import excerpt_text
from h64lm.model import H64LMConfig, H64LMForCausalLM

VOCAB = 192
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4,
             num_kv_heads=2, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
             num_experts_per_token=2, max_position_embeddings=128)


@functools.lru_cache(maxsize=None)
def sample_text(chars: int = 200_000) -> str:
    """Real English from the repository's own offline source (the default corpus's Wikipedia
    excerpt), so these tests need nothing beside the checkout."""
    return excerpt_text(chars)


def build_tokenizer(out_dir: Path):
    """A HF fast tokenizer with at most VOCAB ids (<s>=0, </s>=1, <unk>=2) saved in `out_dir`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.BPE(unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>", "<unk>"],
                                  )
    raw.train_from_iterator([sample_text(50_000)], trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>")
    tok.save_pretrained(str(out_dir))
    return tok


def tiny_model(seed: int = 0, **overrides) -> H64LMForCausalLM:
    torch.manual_seed(seed)
    model = H64LMForCausalLM(H64LMConfig(**{**SMALL, **overrides})).eval()
    with torch.no_grad():  # norms away from 1, so a swapped norm weight shows in the logits
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return model
