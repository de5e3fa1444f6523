"""The bad inputs of the fault suite, shared by the tests and `experiments/faults.py`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["BAD_CONFIGS", "DataCase", "bad_data_cases", "write_bad_files"]

# (overrides, the key the message must name)
BAD_CONFIGS = [
    (["train.max_steps=many"], "train.max_steps"),  # wrong type
    (["optim.lr=fast"], "optim.lr"),
    (["model.hiden_size=64"], "hiden_size"),  # typo
    (["+model.hiden_size=64"], "model.hiden_size"),  # typo that bypasses the schema
    (["+train.lr=0.1"], "train.lr"),  # right key, wrong group
    (["model=huge"], "model/huge"),  # no such preset
    (["model.num_attention_heads=3"], "model.num_attention_heads"),  # 128 % 3 != 0
    (["model.hidden_size=36", "model.num_attention_heads=4"], "model.hidden_size"),  # odd head_dim
    (["model.num_kv_heads=0"], "model.num_kv_heads"),
    (["model.num_experts_per_token=9"], "model.num_experts_per_token"),  # top-k > experts
    (["model.moe_layers=[1,9]"], "model.moe_layers"),  # a layer that does not exist
    (["model.moe_layers=sometimes"], "model.moe_layers"),
    (["model.sliding_window=0"], "model.sliding_window"),  # window 0
    (["model.position_encoding=xpos"], "model.position_encoding"),
    (["model.dropout=1.0"], "model.dropout"),
    (["model.capacity_factor=0"], "model.capacity_factor"),
    (["model.vocab_size=0"], "model.vocab_size"),
    (["optim.lr=0"], "optim.lr"),  # non-positive lr
    (["optim.beta2=1.0"], "optim.beta2"),
    (["optim.warmup_steps=-5"], "optim.warmup_steps"),
    (["optim.grad_clip=-1"], "optim.grad_clip"),
    (["hardware.precision=fp64"], "hardware.precision"),  # unknown precision
    (["hardware.device=tpu"], "hardware.device"),
    (["data.seq_len=1024"], "data.seq_len gives 1024 positions, more than model.max_position_embeddings"),
    (["train.extra_eval_seq_lens=[4096]"], "train.extra_eval_seq_lens"),
    (["data.seq_len=0"], "data.seq_len"),
    (["data=text"], "data.path"),  # text without a file
    (["data.val_fraction=1.0"], "data.val_fraction"),
    (["train.max_bad_steps=0"], "train.max_bad_steps"),
    (["train.keep_last=0"], "train.keep_last"),
    (["train.global_batch_size=3", "train.batch_size=2"], "train.global_batch_size"),
    (["train.global_batch_size=8", "train.batch_size=2", "train.grad_accum=3"], "train.grad_accum"),
    (["logger.name=tensorboard"], "logger.name"),
    (["gen.temperature=-0.5"], "gen.temperature"),
    (["optim.lr=inf"], "optim.lr=inf must be a finite number"),  # non-finite floats
    (["optim.lr=nan"], "optim.lr=nan must be a finite number"),
    (["train.val_batch_size=-1"], "train.val_batch_size"),  # integer ranges
    (["hardware.num_threads=-1"], "hardware.num_threads"),
]


@dataclass
class DataCase:
    name: str
    overrides: list[str]  # added to `data=text`
    message_start: str  # the one line the run must stop with


def write_bad_files(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "empty.txt").write_text("")
    (folder / "short.txt").write_text("Only a handful of words.")
    (folder / "noise.txt").write_bytes(b"".join(os.urandom(3000) + b"\n\n" for _ in range(40)))
    (folder / "no_tokenizer").mkdir(exist_ok=True)


def bad_data_cases(folder: Path, corpus: Path) -> list[DataCase]:
    """The cases, reading the files `write_bad_files(folder)` writes and a good `corpus`."""
    return [
        DataCase("missing path", [f"data.path={folder}/nowhere.txt"],
                 f"data.path={folder}/nowhere.txt does not exist"),
        DataCase("empty file", [f"data.path={folder}/empty.txt"],
                 f"data.path={folder}/empty.txt has 0 document(s)"),
        DataCase("shorter than one window",
                 [f"data.path={folder}/short.txt", f"data.val_path={folder}/short.txt"],
                 "data.seq_len=32: the train split has"),
        DataCase("tokenizer larger than the model", [f"data.path={corpus}", "model.vocab_size=1000"],
                 "model.vocab_size=1000 is smaller than the tokenizer's 32000 ids"),
        DataCase("no such tokenizer", [f"data.path={corpus}", f"data.tokenizer={folder}/none"],
                 f"data.tokenizer='{folder}/none' is neither 'mistral'"),
        DataCase("folder without a tokenizer",
                 [f"data.path={corpus}", f"data.tokenizer={folder}/no_tokenizer"], "data.tokenizer"),
        DataCase("binary file", [f"data.path={folder}/noise.txt"], "data.path"),
    ]
