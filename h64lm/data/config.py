"""`DataConfig`: the schema of the `data` config group (registered as `base_data`).

Each field is documented in `conf/data/*.yaml`; values are checked here so a bad one fails
before any text is read, with the key to change in the message.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SOURCES", "TXT_SPLITS", "DataConfig", "expand_path", "resolve_cache_dir"]

SOURCES = ("wiki_excerpt", "wikitext103", "wikitext2", "text")
TXT_SPLITS = ("auto", "wikitext", "paragraph", "file")


@dataclass
class DataConfig:
    name: str = "wiki_excerpt"  # wiki_excerpt | wikitext103 | wikitext2 | text
    tokenizer: str = "mistral"  # "mistral" (the mistral-common 32k model) or a HF tokenizer folder
    seq_len: int = 256  # tokens per training window (the model reads seq_len + 1 per window)
    path: str | None = None  # text: a .txt/.jsonl/.parquet file or a folder of them
    val_path: str | None = None  # text: a separate validation file/folder (else val_fraction)
    val_fraction: float = 0.05  # share of the text held out, whole documents in hash order
    text_field: str = "text"  # jsonl/parquet: the column holding the text
    txt_split: str = "auto"  # .txt documents: auto | wikitext | paragraph | file
    max_samples: int | None = None  # read at most this many records per split (null: all)
    streaming: bool = False  # hub sources: stream rows instead of downloading the whole split
    hub_dataset: str = "Salesforce/wikitext"  # hub sources: the dataset repository
    hub_config: str | None = None  # hub sources: e.g. wikitext-103-raw-v1
    cache_dir: str | None = None  # null: $H64LM_CACHE_DIR, else ~/.cache/h64lm
    num_proc: int | None = None  # tokenization processes (null: up to 8, by CPU count)
    val_windows: int | None = None  # fixed validation windows (null: every window)

    def __post_init__(self) -> None:
        def check(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(message)

        check(self.name in SOURCES, f"data.name={self.name!r} must be one of {SOURCES}")
        check(bool(self.tokenizer), "data.tokenizer must be 'mistral' or a tokenizer folder")
        check(self.seq_len >= 1, f"data.seq_len={self.seq_len} must be >= 1")
        check(0 <= self.val_fraction < 1,
              f"data.val_fraction={self.val_fraction} must be in [0, 1)")
        check(self.txt_split in TXT_SPLITS,
              f"data.txt_split={self.txt_split!r} must be one of {TXT_SPLITS}")
        check(self.max_samples is None or self.max_samples >= 1,
              f"data.max_samples={self.max_samples} must be >= 1 or null (all records)")
        check(self.num_proc is None or self.num_proc >= 1,
              f"data.num_proc={self.num_proc} must be >= 1 or null (automatic)")
        check(self.val_windows is None or self.val_windows >= 1,
              f"data.val_windows={self.val_windows} must be >= 1 or null (every window)")
        # `~` and `$VAR` are expanded here, once, so every later message shows the real path.
        self.path = expand_path(self.path, "data.path")
        self.val_path = expand_path(self.val_path, "data.val_path")
        self.cache_dir = expand_path(self.cache_dir, "data.cache_dir")
        if self.tokenizer != "mistral":
            self.tokenizer = expand_path(self.tokenizer, "data.tokenizer")
        if self.name == "text":
            check(self.path is not None, "data=text needs data.path=<file or folder>")
            check(self.val_path is not None or self.val_fraction > 0,
                  "data=text needs data.val_path=<file or folder> or data.val_fraction > 0")
        if self.name in ("wikitext103", "wikitext2"):
            check(bool(self.hub_config), f"data={self.name} needs data.hub_config")


def expand_path(value: str | None, key: str) -> str | None:
    """`value` with `~` and `$VAR` / `${VAR}` expanded; an unset variable is refused, never kept
    as literal text (that would silently read or create a folder named `$VAR`)."""
    if value is None:
        return None
    names = [a or b for a, b in re.findall(r"\$(?:(\w+)|\{([^}]*)\})", value)]
    unset = [name for name in names if name not in os.environ]
    if unset:
        raise ValueError(f"{key}={value}: environment variable ${unset[0]} is not set; "
                         f"set it or write the path out in {key}")
    return os.path.expanduser(os.path.expandvars(value))


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else `$H64LM_CACHE_DIR` (tests and CI redirect it), else ~/.cache/h64lm."""
    chosen = cfg.cache_dir or expand_path(os.environ.get("H64LM_CACHE_DIR"), "$H64LM_CACHE_DIR")
    return Path(chosen) if chosen else Path.home() / ".cache" / "h64lm"
