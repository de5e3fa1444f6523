"""Local text files (`data=text`) read through `datasets`, as a dataset of documents.

`data.path` is a `.txt`, `.jsonl` or `.parquet` file, or a folder holding files of one of those
types (searched recursively). jsonl/parquet rows are documents, their text in `data.text_field`.
A `.txt` file is cut into documents by `data.txt_split`:
  wikitext   at WikiText's top-level headings (a line ` = Title = `), one article per document;
  paragraph  at blank lines;
  file       one document per file;
  auto       wikitext when the file has such a heading, else paragraph.
Undecodable bytes are replaced by U+FFFD, with a warning naming the file.
"""

from __future__ import annotations

import itertools
import json
import re
import warnings
from pathlib import Path

from h64lm.data.config import DataConfig

__all__ = [
    "FILE_TYPES",
    "files_identity",
    "find_files",
    "is_wikitext_title",
    "load_text_files",
    "split_txt",
]

FILE_TYPES = {".txt": "text", ".jsonl": "json", ".parquet": "parquet"}
_WIKITEXT_TITLE = re.compile(r"^ ?= [^=].* = ?$", re.MULTILINE)
_BLANK_LINES = re.compile(r"\n[ \t]*\n")


def find_files(path: str, key: str) -> list[Path]:
    """The data files under `path` (a file or a folder), all of one supported type."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"{key}={path} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    if root.is_dir():
        files = [p for p in files if p.suffix in FILE_TYPES]
        if not files:
            raise ValueError(f"{key}={path} holds no {'/'.join(FILE_TYPES)} files")
    kinds = sorted({p.suffix for p in files})
    unknown = [k for k in kinds if k not in FILE_TYPES]
    if unknown:
        raise ValueError(
            f"{key}={path}: unknown file type {unknown[0] or '(no suffix)'!r}; "
            f"supported: {', '.join(FILE_TYPES)}"
        )
    if len(kinds) > 1:
        raise ValueError(f"{key}={path} mixes file types {kinds}; use a folder of one type")
    return files


def files_identity(files: list[Path]) -> list[list]:
    """What identifies the files' content cheaply: path, size and modification time."""
    return [[str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def is_wikitext_title(line: str) -> bool:
    return _WIKITEXT_TITLE.match(line.rstrip("\n")) is not None


def split_txt(text: str, mode: str) -> list[str]:
    """Documents of one `.txt` file's text (see the module docstring for the modes)."""
    if mode == "auto":
        mode = "wikitext" if _WIKITEXT_TITLE.search(text) else "paragraph"
    if mode == "file":
        parts = [text]
    elif mode == "paragraph":
        parts = _BLANK_LINES.split(text)
    else:
        starts = [m.start() for m in _WIKITEXT_TITLE.finditer(text)]
        bounds = [0, *starts, len(text)]
        parts = [text[a:b] for a, b in itertools.pairwise(bounds)]
    return [doc for doc in (p.strip() for p in parts) if doc]


def _has_undecodable_bytes(files: list[Path], key: str) -> bool:
    """Warn about stray undecodable bytes; refuse a file that is binary rather than text."""
    bad = []
    for p in files:
        raw = p.read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as err:
            replaced = raw.decode("utf-8", "replace").count("\ufffd")
            has_nul = b"\x00" in raw
            if has_nul or replaced > 0.01 * max(1, len(raw)):
                nul = ", NUL bytes" if has_nul else ""
                raise ValueError(
                    f"{key}={p} looks binary, not text ({replaced} undecodable bytes of "
                    f"{len(raw)}{nul}); point {key} at text files"
                ) from None
            bad.append(f"{p} (first at byte {err.start})")
    if bad:
        warnings.warn(f"undecodable UTF-8 bytes replaced by U+FFFD in: {', '.join(bad)}",
                      stacklevel=3)
    return bool(bad)


def _jsonl_texts(files: list[Path], field: str, key: str, errors: str,
                 skipped: dict) -> list[str]:
    """The `field` strings of every row. A row that is not a JSON object, or whose `field` holds
    something other than a string or null, stops the run naming its file and line; a row whose
    `field` is missing, null or blank is skipped and counted in `skipped`."""
    texts: list[str] = []
    columns: dict[str, None] = {}  # every key seen, in order (for the error naming the field)
    rows = no_text = empty = 0
    first = None
    for path in files:
        with open(path, "rb") as f:
            for number, raw in enumerate(f, 1):
                line = raw.decode("utf-8", errors).strip()
                if not line:
                    continue  # a blank line is no row
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{key}={path}: line {number} is not valid JSON ({err.msg} "
                                     f"at column {err.colno}); fix or delete that line") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{key}={path}: line {number} is a JSON "
                                     f"{type(row).__name__}, not an object; one object per line")
                rows += 1
                columns.update(dict.fromkeys(row))
                text = row.get(field)
                if text is not None and not isinstance(text, str):
                    raise ValueError(
                        f"{key}={path}: line {number}: data.text_field={field!r} holds a "
                        f"{type(text).__name__} ({json.dumps(text)[:40]}), not a string; fix the "
                        "row or set data.text_field")
                if text is None or not text.strip():
                    no_text, empty = no_text + (text is None), empty + (text is not None)
                    first = first or f"{path} line {number}"
                    continue
                texts.append(text)
    if rows and field not in columns:
        raise ValueError(f"data.text_field={field!r} is not a column of {key}={files[0]} "
                         f"(columns: {', '.join(columns)})")
    if no_text or empty:
        skipped[key] = {"rows": rows, "no_text": no_text, "empty": empty, "first": first}
    return texts


def _parquet_texts(ds, field: str, key: str, files: list[Path], skipped: dict):
    """Check that `field` holds strings; count (then drop) its null and blank rows."""
    import pyarrow as pa
    import pyarrow.compute as pc

    column = ds.data.column(field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        raise ValueError(f"data.text_field={field!r} of {key}={files[0]} holds {column.type}, "
                         "not strings; set data.text_field to a text column")
    no_text = column.null_count
    empty = pc.sum(pc.equal(pc.utf8_trim_whitespace(column), "")).as_py() or 0
    if no_text or empty:
        skipped[key] = {"rows": len(ds), "no_text": no_text, "empty": empty, "first": None}
    ds = ds.select_columns([field])
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def load_text_files(cfg: DataConfig, files: list[Path], key: str, hf_cache: Path,
                    skipped: dict | None = None):
    """A `datasets.Dataset` with one column `text`, one row per non-empty document.

    jsonl/parquet rows without text are dropped and counted in `skipped[key]` (see
    `_jsonl_texts`); a malformed row stops the run naming its file and line.
    """
    from datasets import Dataset, load_dataset

    skipped = {} if skipped is None else skipped
    builder = FILE_TYPES[files[0].suffix]
    replace = builder in ("text", "json") and _has_undecodable_bytes(files, key)
    if builder == "json":
        ds = Dataset.from_dict({"text": _jsonl_texts(files, cfg.text_field, key,
                                                     "replace" if replace else "strict", skipped)})
    elif builder == "text":
        options = {"encoding": "utf-8", "encoding_errors": "replace"} if replace else {}
        ds = load_dataset(builder, data_files=[str(p) for p in files], split="train",
                          cache_dir=str(hf_cache), sample_by="document", **options)
        ds = ds.map(lambda batch: {"text": [d for t in batch["text"]
                                            for d in split_txt(t, cfg.txt_split)]},
                    batched=True)
    else:
        ds = load_dataset(builder, data_files=[str(p) for p in files], split="train",
                          cache_dir=str(hf_cache))
        if cfg.text_field not in ds.column_names:
            raise ValueError(
                f"data.text_field={cfg.text_field!r} is not a column of {key}={files[0]} "
                f"(columns: {', '.join(ds.column_names)})"
            )
        ds = _parquet_texts(ds, cfg.text_field, key, files, skipped)
    if cfg.max_samples is not None and len(ds) > cfg.max_samples:
        ds = ds.select(range(cfg.max_samples))
    return ds
