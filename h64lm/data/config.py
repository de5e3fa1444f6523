"""`DataConfig`: the schema of the `data` config group; its defaults are `data=wiki_excerpt`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from h64lm.validation import bounded, check, validate_fields

__all__ = ["PREFERENCE_SOURCES", "SFT_FORMATS", "SFT_HUB_SOURCES", "SFT_SOURCES", "SOURCES", "TXT_SPLITS",
           "DataConfig", "expand_path", "resolve_cache_dir"]

# Conversations for supervised fine-tuning (h64lm/data/sft_sources.py), not pretraining text.
SFT_HUB_SOURCES = ("alpaca", "dolly", "gsm8k", "oasst")
SFT_SOURCES = ("chat", "arithmetic") + SFT_HUB_SOURCES
# How a row holds a conversation (h64lm/data/sft_sources.py); auto: from each file's first row.
SFT_FORMATS = ("auto", "alpaca", "dolly", "gsm8k", "messages", "sharegpt", "oasst")
# Preference pairs (chosen vs rejected answers) for reward-model / DPO stages: h64lm/data/preference.py
PREFERENCE_SOURCES = ("preference_arithmetic", "preference", "ultrafeedback", "hh_rlhf")
SOURCES = ("wiki_excerpt", "wikitext103", "wikitext2", "text") + PREFERENCE_SOURCES
TXT_SPLITS = ("auto", "wikitext", "paragraph", "file")


@dataclass
class DataConfig:
    config_group: ClassVar[str] = "data"

    name: str = bounded("wiki_excerpt", choices=SOURCES + SFT_SOURCES)
    tokenizer: str = "mistral"  # "mistral" (the mistral-common 32k model) or a HF tokenizer folder
    seq_len: int = bounded(256, ge=1)  # tokens per training window (the model reads seq_len + 1)
    path: str | None = None  # text: a .txt/.jsonl/.parquet file or a folder of them
    val_path: str | None = None  # text: a separate validation file/folder (else val_fraction)
    val_fraction: float = bounded(0.05, ge=0, lt=1)  # share held out, whole documents in hash order
    text_field: str = "text"  # jsonl/parquet: the column holding the text
    txt_split: str = bounded("auto", choices=TXT_SPLITS)  # .txt documents: how a file splits
    max_samples: int | None = bounded(None, ge=1, null="all records")  # records read per split
    streaming: bool = False  # hub sources: stream rows instead of downloading the whole split
    hub_dataset: str = "Salesforce/wikitext"  # hub sources: the dataset repository
    hub_config: str | None = None  # hub sources: e.g. wikitext-103-raw-v1
    cache_dir: str | None = None  # null: $H64LM_CACHE_DIR, else ~/.cache/h64lm
    num_proc: int | None = bounded(None, ge=1, null="up to 8, by CPU count and corpus size")
    # Fixed, evenly spaced validation windows; 64 x 256 tokens keep an evaluation ~2 s on a CPU.
    val_windows: int | None = bounded(64, ge=1, null="every window")
    # Pretraining: the loader marks each corpus document (EOS-separated) in Batch.document_ids,
    # so attention and positions restart at every document instead of running across them.
    document_mask: bool = False
    format: str = bounded("auto", choices=SFT_FORMATS)  # SFT sources: the rows' layout

    def __post_init__(self) -> None:
        validate_fields(self)
        check(bool(self.tokenizer), "data.tokenizer must be 'mistral' or a tokenizer folder")
        # `~` and `$VAR` are expanded here, once, so every later message shows the real path.
        self.path = expand_path(self.path, "data.path")
        self.val_path = expand_path(self.val_path, "data.val_path")
        self.cache_dir = expand_path(self.cache_dir, "data.cache_dir")
        if self.tokenizer != "mistral":
            self.tokenizer = expand_path(self.tokenizer, "data.tokenizer")
        if self.name in ("text", "chat"):
            check(self.path is not None, f"data={self.name} needs data.path=<file or folder>")
            check(self.val_path is not None or self.val_fraction > 0,
                  f"data={self.name} needs data.val_path=<file or folder> or data.val_fraction > 0")
        if self.name == "preference":
            check(self.path is not None,
                  "data.name=preference needs data.path=<.jsonl/.parquet file or folder of pairs>")
        if self.name in SFT_SOURCES:
            check(self.tokenizer == "mistral", f"data={self.name}: conversations use Mistral's v1 "
                  "chat format from mistral-common; set data.tokenizer=mistral")
        else:
            check(self.format == "auto", f"data.format={self.format} applies to conversation "
                  f"sources (data={' | data='.join(SFT_SOURCES)}), not data={self.name}")
        if self.name in ("wikitext103", "wikitext2"):
            check(bool(self.hub_config), f"data={self.name} needs data.hub_config")


def expand_path(value: str | None, key: str) -> str | None:
    """`value` with `~` and `$VAR` / `${VAR}` expanded; an unset variable is refused, never kept
    as literal text (that would silently read or create a folder named `$VAR`)."""
    if value is None:
        return None
    names = [a or b for a, b in re.findall(r"\$(?:(\w+)|\{([^}]*)\})", value)]
    unset = [name for name in names if name not in os.environ]
    check(not unset, f"{key}={value}: environment variable ${unset[0] if unset else ''} is not set; "
          f"set it or write the path out in {key}")
    return os.path.expanduser(os.path.expandvars(value))


def resolve_cache_dir(cfg: DataConfig) -> Path:
    """`data.cache_dir`, else `$H64LM_CACHE_DIR` (tests and CI redirect it), else ~/.cache/h64lm."""
    chosen = cfg.cache_dir or expand_path(os.environ.get("H64LM_CACHE_DIR"), "$H64LM_CACHE_DIR")
    path = Path(chosen) if chosen else Path.home() / ".cache" / "h64lm"
    key = ("data.cache_dir" if cfg.cache_dir else "$H64LM_CACHE_DIR" if chosen
           else "data.cache_dir (default ~/.cache/h64lm)")
    try:  # every cache builder writes here: one line now instead of an OSError traceback later
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"cannot create the cache folder {path} ({e.strerror}); point {key} at a "
                         "writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ValueError(f"the cache folder {path} is not writable (read-only or no permission); "
                         f"point {key} at a writable folder")
    return path
