"""Documents -> one flat array of token ids per split, cached on disk and memory-mapped.

Layout of a split: every document becomes `BOS doc EOS` (BOS only when the tokenizer has one
distinct from EOS), and the documents follow each other with nothing between them. Windows cut
from this stream cross document boundaries; EOS then BOS tell the model where one ends.

The cache folder `<cache_dir>/corpus/<name>-<fingerprint>/` holds `train.bin`, `val.bin`
(raw uint16 ids, uint32 when the vocabulary exceeds 65536), `meta.json` and `manifest.json`
(sizes and CRC-32s, h64lm/data/integrity.py). At every open the `.bin` sizes are checked against
meta.json's token counts and dtype and the content against the manifest; a damaged folder is
rebuilt with one line saying why. meta.json also counts the rows skipped for having no text
(`skipped`), and every run prints that count. The fingerprint
hashes what determines the ids: the source's identity (files' paths, sizes and mtimes; the
hub dataset; the split rule) and the tokenizer's full definition. `data.seq_len` is not part of
it: windows are cut when loading, so one cache serves every window length.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from h64lm.data.cache import build_once
from h64lm.data.config import DataConfig, resolve_cache_dir
from h64lm.data.sources import load_documents, source_identity
from h64lm.data.tokenizer import Tokenizer

__all__ = ["FORMAT_VERSION", "Corpus", "corpus_fingerprint", "prepare_corpus"]

FORMAT_VERSION = 2  # 2: manifest.json, meta.json `skipped`
_SPLITS = ("train", "val")
_BATCH = 1000  # documents per tokenizer call


@dataclass
class Corpus:
    train: np.ndarray  # [N_train] token ids, memory-mapped
    val: np.ndarray  # [N_val]
    meta: dict[str, Any]
    path: Path


def corpus_fingerprint(cfg: DataConfig, tokenizer: Tokenizer) -> str:
    key = {"format": FORMAT_VERSION, "source": source_identity(cfg),
           "tokenizer": tokenizer.fingerprint}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _auto_num_proc(n_docs: int) -> int:
    # A worker costs ~1 s to start and the fast tokenizer already uses every core, so extra
    # processes only pay off on large corpora.
    return max(1, min(os.cpu_count() or 1, 8, n_docs // 2000))


def _token_dtype(tokenizer: Tokenizer) -> np.dtype:
    return np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)


def _frame(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    bos = tokenizer.bos_id is not None and tokenizer.bos_id != tokenizer.eos_id
    return tokenizer.encode_batch(texts, bos=bos, eos=True)


def _tokenize_batch(batch: dict, tokenizer: Tokenizer) -> dict:
    return {"ids": _frame(tokenizer, batch["text"])}


def _write_dataset(docs, tokenizer: Tokenizer, out, dtype, num_proc: int | None) -> int:
    """Tokenize a `datasets.Dataset` with `map` in `num_proc` processes; stream ids to `out`."""
    import pyarrow.compute as pc

    num_proc = num_proc or _auto_num_proc(len(docs))
    ids = docs.map(_tokenize_batch, batched=True, batch_size=_BATCH,
                   num_proc=num_proc if num_proc > 1 else None,  # 1 still forks a worker
                   remove_columns=docs.column_names, fn_kwargs={"tokenizer": tokenizer},
                   # A fresh name: nothing is cached on disk, and hashing the tokenizer is slow.
                   new_fingerprint=f"h64lm-tokens-{uuid.uuid4().hex}",
                   keep_in_memory=True, desc="tokenize")
    count = 0
    for chunk in ids.data.column("ids").chunks:
        flat = pc.list_flatten(chunk).to_numpy(zero_copy_only=False).astype(dtype)
        flat.tofile(out)
        count += flat.size
    return count


def _write_stream(docs, tokenizer: Tokenizer, out, dtype) -> int:
    """Tokenize an iterable of documents (streaming sources) in batches, in this process."""
    count, batch = 0, []
    for text in itertools.chain(docs, [None]):
        if text is not None:
            batch.append(text)
        if batch and (text is None or len(batch) == _BATCH):
            flat = np.concatenate([np.asarray(doc, dtype=dtype)
                                   for doc in _frame(tokenizer, batch)])
            flat.tofile(out)
            count, batch = count + flat.size, []
    return count


def _build(cfg: DataConfig, tokenizer: Tokenizer, num_proc: int | None,
           fingerprint: str) -> Callable[[Path], None]:
    def build(folder: Path) -> None:
        from datasets import Dataset

        started = time.perf_counter()
        skipped: dict = {}
        splits = load_documents(cfg, resolve_cache_dir(cfg) / "hf_datasets", skipped)
        dtype = _token_dtype(tokenizer)
        counts, docs_counts = {}, {}
        for name, docs in zip(_SPLITS, splits):
            with open(folder / f"{name}.bin", "wb") as out:
                if isinstance(docs, Dataset):
                    if len(docs) == 0:
                        raise _empty(cfg, name)
                    docs_counts[name] = len(docs)
                    counts[name] = _write_dataset(docs, tokenizer, out, dtype, num_proc)
                else:
                    counts[name] = _write_stream(docs, tokenizer, out, dtype)
        meta = {"source": cfg.name, "fingerprint": fingerprint, "dtype": dtype.name,
                "tokens": counts, "documents": docs_counts, "format": FORMAT_VERSION,
                "identity": source_identity(cfg), "tokenizer": tokenizer.fingerprint,
                "vocab_size": tokenizer.vocab_size, "skipped": skipped,
                "built_by_pid": os.getpid(),
                "seconds": round(time.perf_counter() - started, 3)}
        (folder / "meta.json").write_text(json.dumps(meta, indent=1))
    return build


def _empty(cfg: DataConfig, split: str) -> ValueError:
    where = {"train": f"data.path={cfg.path}", "val": f"data.val_path={cfg.val_path}"}[split]
    return ValueError(f"data={cfg.name}: the {split} split is empty (empty corpus)"
                      + (f"; check {where}" if cfg.name == "text" else ""))


def _check_split(cfg: DataConfig, corpus: Corpus, split: str) -> None:
    tokens = getattr(corpus, split).size
    if tokens == 0:
        raise _empty(cfg, split)
    if tokens < cfg.seq_len + 1:
        raise ValueError(
            f"data.seq_len={cfg.seq_len}: the {split} split has {tokens} tokens, fewer than one "
            f"window of seq_len + 1 = {cfg.seq_len + 1}; lower data.seq_len or add text"
        )


def _memmap(path: Path, dtype: str) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _read_meta(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def _cache_problem(folder: Path, fingerprint: str, dtype: np.dtype) -> str | None:
    """What is wrong with a finished cache folder beyond its manifest (None: nothing)."""
    try:
        meta = _read_meta(folder)
    except FileNotFoundError:
        return "meta.json is missing"
    except ValueError:
        return "meta.json is not valid JSON"
    try:
        if meta["fingerprint"] != fingerprint or meta["format"] != FORMAT_VERSION:
            return "meta.json describes another corpus"
        if meta["dtype"] != dtype.name:
            return f"meta.json says dtype {meta['dtype']}, the tokenizer needs {dtype.name}"
        for split in _SPLITS:
            size, tokens = (folder / f"{split}.bin").stat().st_size, meta["tokens"][split]
            if size != tokens * dtype.itemsize:
                return (f"{split}.bin has {size} bytes, meta.json says {tokens} tokens of "
                        f"{dtype.itemsize} bytes")
    except (KeyError, TypeError):
        return "meta.json lacks fields"
    except FileNotFoundError as err:
        return f"{Path(err.filename).name} is missing"
    return None


def _report_skipped(meta: dict[str, Any]) -> None:
    if int(os.environ.get("RANK", "0")) != 0:  # one line per run, not per rank
        return
    for key, s in meta.get("skipped", {}).items():
        first = f"; first: {s['first']}" if s.get("first") else ""
        print(f"{key}: skipped {s['no_text'] + s['empty']} of {s['rows']} rows: {s['no_text']} "
              f"without data.text_field (missing or null), {s['empty']} blank{first} "
              f"(counts in {meta['source']} cache meta.json)", flush=True)


def prepare_corpus(cfg: DataConfig, tokenizer: Tokenizer,
                   num_proc: int | None = None) -> Corpus:
    """The token ids of `cfg`'s source, tokenized once and reused from the cache afterwards.

    Safe when several processes call it at once: one builds, the others wait and reuse. A
    damaged cache folder is rebuilt (see the module docstring).
    """
    fingerprint = corpus_fingerprint(cfg, tokenizer)
    final = resolve_cache_dir(cfg) / "corpus" / f"{cfg.name}-{fingerprint}"
    build = _build(cfg, tokenizer, num_proc or cfg.num_proc, fingerprint)
    dtype = _token_dtype(tokenizer)
    folder, _ = build_once(final, build,
                           check=lambda f: _cache_problem(f, fingerprint, dtype))
    meta = _read_meta(folder)
    corpus = Corpus(train=_memmap(folder / "train.bin", meta["dtype"]),
                    val=_memmap(folder / "val.bin", meta["dtype"]), meta=meta, path=folder)
    _report_skipped(meta)
    for split in _SPLITS:
        _check_split(cfg, corpus, split)
    return corpus
