"""Where documents come from: one function per `data.name`, each giving train and val documents.

A document is one string (an article, a jsonl row...). Sources without their own validation split
hold out documents by a hash of a key (the title, else the text): documents are visited in hash
order and go to validation until it holds `data.val_fraction` of the characters. The split is
therefore the same on every run and machine, no document is in both, and even a small corpus
gets a non-empty validation split.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union
from urllib.parse import urlparse

import numpy as np

from h64lm.data.config import PREFERENCE_SOURCES, SFT_SOURCES, DataConfig
from h64lm.data.files import (
    files_identity,
    find_files,
    is_wikitext_title,
    load_text_files,
    split_txt,
)
from h64lm.data.wiki import WIKI_EXCERPT_VERSION, wiki_articles, wiki_excerpt_file

if TYPE_CHECKING:
    from datasets import Dataset

__all__ = ["Documents", "hash_order", "check_hub", "hub_available", "hub_unreachable",
           "load_documents", "source_identity", "split_by_hash"]

# A Dataset (random access, tokenized in parallel) or any iterable of strings (streaming).
Documents = Union["Dataset", Iterable[str]]

# Bump when the way documents are cut or split changes, so stale caches are not reused.
SPLIT_VERSION = 1
_HUB_SPLITS = {"train": "train", "val": "validation"}


def hash_order(keys: list[str]) -> np.ndarray:
    digests = [hashlib.sha256(k.encode("utf-8", "replace")).digest()[:8] for k in keys]
    return np.argsort(np.array([int.from_bytes(d, "big") for d in digests], dtype=np.uint64),
                      kind="stable")


def split_by_hash(ds, val_fraction: float, key: str = "text", what: str = "data"):
    """(train, val) `datasets.Dataset`s; see the module docstring for the rule."""
    if len(ds) < 2:
        raise ValueError(
            f"{what} has {len(ds)} document(s): too few to hold out validation documents; "
            "add text or set data.val_path=<file or folder>"
        )
    order = hash_order(ds[key])
    sizes = np.array([len(t) for t in ds["text"]], dtype=np.int64)[order]
    before = np.cumsum(sizes) - sizes
    n_val = int(np.clip(np.sum(before < val_fraction * sizes.sum()), 1, len(ds) - 1))
    val = np.sort(order[:n_val])
    train = np.sort(order[n_val:])
    return ds.select(train), ds.select(val)


def _wiki_excerpt(cfg: DataConfig, hf_cache: Path,
                  skipped: dict) -> tuple[Documents, Documents]:
    from datasets import Dataset

    articles = list(wiki_articles())[: cfg.max_samples]
    ds = Dataset.from_dict({"title": [a[0] for a in articles], "text": [a[1] for a in articles]})
    return split_by_hash(ds, cfg.val_fraction, key="title", what="data=wiki_excerpt")


def _text(cfg: DataConfig, hf_cache: Path, skipped: dict) -> tuple[Documents, Documents]:
    docs = load_text_files(cfg, find_files(cfg.path, "data.path"), "data.path", hf_cache, skipped)
    if cfg.val_path is not None:
        val = load_text_files(cfg, find_files(cfg.val_path, "data.val_path"), "data.val_path",
                              hf_cache, skipped)
        return docs, val
    return split_by_hash(docs, cfg.val_fraction, what=f"data.path={cfg.path}")


def _hub_offline_reason() -> str | None:
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        if os.environ.get(var, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{var}={os.environ[var]}"
    return None


def hub_available(timeout_s: float = 3.0) -> bool:
    """A short TCP check of the hub, so an offline machine fails at once instead of retrying."""
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        socket.create_connection((url.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


_PRETRAINING_OFFLINE = ("data=wiki_excerpt (Wikipedia excerpt shipped with gensim) or data=text "
                        "data.path=<.txt/.jsonl/.parquet file or folder>")


def hub_unreachable(cfg: DataConfig, reason: str,
                    alternatives: str = _PRETRAINING_OFFLINE) -> RuntimeError:
    subset = f" ({cfg.hub_config})" if cfg.hub_config else ""
    return RuntimeError(
        f"data={cfg.name} reads {cfg.hub_dataset}{subset} from the Hugging Face hub, "
        f"which is unreachable ({reason}). Offline alternatives: {alternatives}"
    )


def check_hub(cfg: DataConfig, alternatives: str = _PRETRAINING_OFFLINE) -> str | None:
    """Fail at once, naming `alternatives`, when the hub is unreachable and no offline flag is
    set; return the offline flag's description (`datasets` may still find a split it cached)."""
    offline = _hub_offline_reason()
    if offline is None and not hub_available():
        raise hub_unreachable(cfg, "no connection", alternatives)
    return offline


def _hub_rows_to_articles(rows: Iterable[str]) -> Iterable[str]:
    """WikiText rows are lines (with their newline); an article starts at a ` = Title = ` row."""
    lines: list[str] = []
    for row in rows:
        if lines and is_wikitext_title(row):
            yield from split_txt("".join(lines), "file")
            lines = []
        lines.append(row)
    yield from split_txt("".join(lines), "file")


def _wikitext(cfg: DataConfig, hf_cache: Path,
              skipped: dict) -> tuple[Documents, Documents]:
    from datasets import Dataset, load_dataset

    offline = check_hub(cfg)
    out = []
    for split in ("train", "val"):
        try:
            rows = load_dataset(cfg.hub_dataset, cfg.hub_config, split=_HUB_SPLITS[split],
                                streaming=cfg.streaming, cache_dir=str(hf_cache))
        except (ConnectionError, OSError) as err:
            # Offline mode still finds a split that `datasets` cached earlier; anything else fails.
            raise hub_unreachable(cfg, offline or type(err).__name__) from err
        if cfg.max_samples is not None:
            rows = (rows.take(cfg.max_samples) if cfg.streaming
                    else rows.select(range(min(cfg.max_samples, len(rows)))))
        if cfg.streaming:
            out.append(_hub_rows_to_articles(row["text"] for row in rows))
        else:
            out.append(Dataset.from_dict({"text": list(_hub_rows_to_articles(rows["text"]))}))
    return out[0], out[1]


_SOURCES = {"wiki_excerpt": _wiki_excerpt, "text": _text,
            "wikitext103": _wikitext, "wikitext2": _wikitext}


def load_documents(cfg: DataConfig, hf_cache: Path,
                   skipped: dict | None = None) -> tuple[Documents, Documents]:
    """(train, val) documents of `cfg.name`; `hf_cache` holds what `datasets` caches.

    Rows dropped for having no text are counted in `skipped` (by config key, e.g. data.path).
    """
    _check_pretraining(cfg)
    return _SOURCES[cfg.name](cfg, hf_cache, {} if skipped is None else skipped)


def _check_pretraining(cfg: DataConfig) -> None:
    """Documents to train a language model on: not conversations, not preference pairs."""
    if cfg.name in SFT_SOURCES:
        raise ValueError(f"data={cfg.name} holds conversations for supervised fine-tuning "
                         "(h64lm/data/sft_sources.py), not pretraining text; choose a pretraining "
                         "source such as data=wiki_excerpt or data=text")
    if cfg.name in PREFERENCE_SOURCES:
        raise ValueError(f"data={cfg.name} holds preference pairs for a reward-model or DPO stage "
                         "(h64lm/data/preference.py), not documents to train a language model on; "
                         "use data=wiki_excerpt or data=text data.path=...")


def source_identity(cfg: DataConfig) -> dict[str, Any]:
    """What determines the documents, read without loading them (for the cache fingerprint)."""
    _check_pretraining(cfg)
    ident: dict[str, Any] = {"name": cfg.name, "max_samples": cfg.max_samples,
                             "split_version": SPLIT_VERSION}
    if cfg.name == "wiki_excerpt":
        dump = wiki_excerpt_file()
        ident |= {"dump": dump.name, "bytes": dump.stat().st_size,
                  "cleaning": WIKI_EXCERPT_VERSION, "val_fraction": cfg.val_fraction}
    elif cfg.name == "text":
        ident |= {"files": files_identity(find_files(cfg.path, "data.path")),
                  "text_field": cfg.text_field, "txt_split": cfg.txt_split}
        if cfg.val_path is not None:
            ident["val_files"] = files_identity(find_files(cfg.val_path, "data.val_path"))
        else:
            ident["val_fraction"] = cfg.val_fraction
    else:
        ident |= {"hub_dataset": cfg.hub_dataset, "hub_config": cfg.hub_config}
    return ident
