"""Tiny offline fixtures shared by tests/hf and tests/eval: a 192-id byte-level BPE tokenizer
trained on real text, and small random H64LM models."""

from pathlib import Path

import torch

from h64lm.model import H64LMConfig, H64LMForCausalLM

VOCAB = 192
SMALL = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_attention_heads=4,
             num_kv_heads=2, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
             num_experts_per_token=2, max_position_embeddings=128)
ROOT = Path(__file__).resolve().parents[2]
# the shared WikiText-2 file sits beside the main checkout, two levels up from a worktree
WIKITEXT = [base / "shared" / "data" / "wikitext-2" / "valid.txt"
            for base in (ROOT.parent, ROOT.parent.parent)]


def sample_text(chars: int = 200_000) -> str:
    """Real English (WikiText-2 validation) when the shared copy exists, else a word pattern."""
    for path in WIKITEXT:
        if path.exists():
            return path.read_text(encoding="utf-8")[:chars]
    words = "the of and in to a was is for on as by with at from his that an it were".split()
    lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(60)) + "."
             for i in range(chars // 300)]
    return "\n".join(lines)


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
