"""The data of a supervised fine-tuning stage, from `DataConfig` to packed batches.

    loader, val_batches, skipped = build_sft_data(cfg.data, batch_size, seed, rank, world_size)

`loader` follows the loader protocol (`next_batch() -> Batch`, `state_dict`, `load_state_dict`);
`val_batches` hold every validation conversation once, in a fixed order; `skipped` counts the
rows and conversations left out, by config key, with the place and reason of the first one.
"""

from __future__ import annotations

from h64lm.data.batch import Batch
from h64lm.data.chat import ChatFormat
from h64lm.data.config import DataConfig, resolve_cache_dir
from h64lm.data.packing import PackedLoader, packed_batches
from h64lm.data.sft_sources import encode_conversations, load_conversations

__all__ = ["build_sft_data"]


def build_sft_data(cfg: DataConfig, batch_size: int, seed: int, rank: int = 0,
                   world_size: int = 1) -> tuple[PackedLoader, list[Batch], dict]:
    skipped: dict = {}
    chat = ChatFormat()
    train, val = load_conversations(cfg, resolve_cache_dir(cfg) / "hf_datasets", skipped)
    examples = {}
    for split, convs in (("train", train), ("val", val)):
        encoded = encode_conversations(chat, convs, cfg.seq_len, f"data={cfg.name} {split}",
                                       skipped)
        examples[split] = [(e.input_ids, e.labels) for e in encoded]
    # Mistral has no pad token: padding slots hold EOS, carry no target and form their own document
    loader = PackedLoader(examples["train"], cfg.seq_len, batch_size, seed, chat.eos_id, rank,
                          world_size)
    return loader, packed_batches(examples["val"], cfg.seq_len, batch_size, chat.eos_id), skipped
