"""Conversations for supervised fine-tuning: local files first, the seed's hub data sets second.

`data.name` picks the source:
  chat        `data.path` (and `data.val_path`, else `data.val_fraction` held out by hash): a
              `.jsonl`/`.parquet` file or a folder of them;
  arithmetic  the generated offline task (h64lm/data/tasks/arithmetic.py), train and val splits;
  alpaca, dolly, gsm8k, oasst  the hub data sets of `conf/data/<name>.yaml` (offline: one line
              naming data=arithmetic and data=chat).

A row's layout (`data.format`, or `auto`: read from each file's first row):
  alpaca    {"instruction", "input"?, "output"}          user: instruction [+ "\\n\\n" + input]
  dolly     {"instruction", "context"?, "response"}      user: instruction [+ "\\n\\n" + context]
  gsm8k     {"question", "answer"}                       answer ends with "#### N"
  messages  {"messages": [{"role", "content"}, ...], "system"?}   roles system/user/assistant
  sharegpt  {"conversations": [{"from", "value"}, ...]}  from: system/human/gpt (user/assistant)
  oasst     OpenAssistant message rows {"message_id", "parent_id", "role", "text", "rank"?}: each
            tree becomes one conversation, following the best-ranked reply at every turn.

A line that is not a JSON object stops the run naming its file and line (the file is damaged). A
row that does not make a whole conversation (a missing field, an unknown role, an empty turn, no
final assistant turn: see h64lm/data/chat.py) is skipped and counted in `skipped[key]` with the
place and reason of the first one; if no row is left the run stops with that reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from h64lm.data.chat import ChatFormat, EncodedChat, Message, check_conversation
from h64lm.data.config import DataConfig
from h64lm.data.files import find_files
from h64lm.data.sources import check_hub, hash_order, hub_unreachable

__all__ = [
    "Conversation",
    "detect_format",
    "encode_conversations",
    "load_conversations",
    "read_conversation_files",
    "row_to_conversation",
]

Conversation = list[Message]

_OFFLINE = ("data=arithmetic (generated word problems) or data=chat data.path=<.jsonl/.parquet of "
            "alpaca/dolly/gsm8k/messages/sharegpt rows>")
# hub preset -> (row format, the hub's validation split or None to hold out by hash)
_HUB = {"alpaca": ("alpaca", None), "dolly": ("dolly", None), "gsm8k": ("gsm8k", None),
        "oasst": ("oasst", "validation")}
_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant",
                   "assistant": "assistant"}
_SIGNATURES = (("messages", {"messages"}), ("sharegpt", {"conversations"}),
               ("oasst", {"message_id", "parent_id", "role", "text"}),
               ("alpaca", {"instruction", "output"}), ("dolly", {"instruction", "response"}),
               ("gsm8k", {"question", "answer"}))


def detect_format(row: dict[str, Any], where: str) -> str:
    for fmt, keys in _SIGNATURES:
        if keys <= row.keys():
            return fmt
    raise ValueError(f"{where}: cannot tell the conversation format from the columns "
                     f"({', '.join(row)}); set data.format to one of alpaca, dolly, gsm8k, "
                     "messages, sharegpt, oasst")


def _text(row: dict[str, Any], field: str, optional: bool = False) -> str:
    value = row.get(field)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"field {field!r} is {type(value).__name__}, not text")
    return value


def _prompt_with(row: dict[str, Any], main: str, extra: str) -> str:
    prompt, more = _text(row, main), _text(row, extra, optional=True)
    return f"{prompt}\n\n{more}" if more.strip() else prompt


def _turns(items: Any, role_key: str, text_key: str, roles: dict[str, str] | None) -> Conversation:
    if not isinstance(items, list):
        raise ValueError(f"the turns are a {type(items).__name__}, not a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ValueError(f"turn {i} is a {type(item).__name__}, not an object")
        role = item.get(role_key)
        role = roles.get(role, role) if roles is not None and isinstance(role, str) else role
        out.append(Message(role, _text(item, text_key)))
    return out


def row_to_conversation(row: dict[str, Any], fmt: str) -> Conversation:
    """One row of a per-row format -> a checked conversation (ValueError says what is wrong)."""
    if fmt == "alpaca":
        conv = [Message("user", _prompt_with(row, "instruction", "input")),
                Message("assistant", _text(row, "output"))]
    elif fmt == "dolly":
        conv = [Message("user", _prompt_with(row, "instruction", "context")),
                Message("assistant", _text(row, "response"))]
    elif fmt == "gsm8k":
        conv = [Message("user", _text(row, "question")), Message("assistant", _text(row, "answer"))]
    elif fmt == "messages":
        conv = _turns(row.get("messages"), "role", "content", None)
        system = _text(row, "system", optional=True)
        conv = [Message("system", system), *conv] if system.strip() else conv
    elif fmt == "sharegpt":
        conv = _turns(row.get("conversations"), "from", "value", _SHAREGPT_ROLES)
    else:
        raise ValueError(f"data.format={fmt} is not a one-row-per-conversation format")
    check_conversation(conv)
    return conv


def _oasst_threads(rows: Iterable[tuple[str, dict]]) -> Iterator[tuple[str, Conversation]]:
    """OpenAssistant trees -> one conversation per tree: from the root prompt, always the
    best-ranked (lowest `rank`, unranked last) non-deleted reply, cut after the last assistant
    turn."""
    nodes: dict[str, tuple[str, dict]] = {}
    children: dict[str, list[str]] = {}
    roots = []
    for where, row in rows:
        if row.get("deleted") or not isinstance(row.get("message_id"), str):
            continue
        nodes[row["message_id"]] = (where, row)
        if row.get("parent_id") is None:
            roots.append(row["message_id"])
        else:
            children.setdefault(row["parent_id"], []).append(row["message_id"])

    def best(ids: list[str]) -> str:
        return min(ids, key=lambda m: (nodes[m][1].get("rank") is None,
                                       nodes[m][1].get("rank") or 0))

    for root in roots:
        thread, current = [root], root
        while [c for c in children.get(current, []) if c in nodes]:
            current = best([c for c in children[current] if c in nodes])
            thread.append(current)
        roles = {"prompter": "user", "assistant": "assistant"}
        conv = [Message(roles.get(nodes[m][1].get("role"), nodes[m][1].get("role")),
                        nodes[m][1].get("text")) for m in thread]
        while conv and conv[-1].role == "user":
            conv.pop()
        yield nodes[root][0], conv


def _file_rows(path: Path, key: str) -> Iterator[tuple[str, dict]]:
    """(place, row) of a jsonl or parquet file; a damaged jsonl line stops the run."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{key}={path} row {number}", row
        return
    if path.suffix != ".jsonl":
        raise ValueError(f"{key}={path}: conversations are read from .jsonl or .parquet files")
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{key}={path} line {number}"
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where} is not valid JSON ({err.msg} at column {err.colno}); "
                                 "fix or delete that line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{where} is a JSON {type(row).__name__}, not an object; "
                                 "one object per line")
            yield where, row


def _collect(rows: Iterable[tuple[str, dict]], fmt: str, key: str, skipped: dict,
             limit: int | None) -> list[Conversation]:
    """Rows -> conversations; whole files in one format (`fmt`, or detected from the first row)."""
    rows = iter(rows)
    first = next(rows, None)
    if first is None:
        return []
    fmt = detect_format(first[1], first[0]) if fmt == "auto" else fmt
    rows = [first, *rows]
    pairs = (_oasst_threads(rows) if fmt == "oasst"
             else ((where, row) for where, row in rows))
    out = []
    entry = skipped.setdefault(key, {"rows": 0, "skipped": 0, "first": None})
    for where, item in pairs:
        entry["rows"] += 1
        try:
            conv = item if fmt == "oasst" else row_to_conversation(item, fmt)
            if fmt == "oasst":
                check_conversation(conv)
        except (ValueError, TypeError) as err:
            entry["skipped"] += 1
            entry["first"] = entry["first"] or f"{where}: {err}"
            continue
        out.append(conv)
        if limit is not None and len(out) >= limit:
            break
    return out


def _no_usable(key: str, skipped: dict) -> ValueError:
    return ValueError(f"{key}: no usable conversation "
                      f"({skipped.get(key, {}).get('first') or 'no rows'})")


def _drop_clean(key: str, skipped: dict) -> None:
    """Keep `skipped[key]` only when a row was skipped, as h64lm/data/files.py does."""
    if not skipped.get(key, {}).get("skipped"):
        skipped.pop(key, None)


def read_conversation_files(files: Sequence[Path], fmt: str, key: str, skipped: dict,
                            limit: int | None = None) -> list[Conversation]:
    out: list[Conversation] = []
    for path in files:
        out += _collect(_file_rows(path, key), fmt, key, skipped,
                        None if limit is None else limit - len(out))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise _no_usable(key, skipped)
    _drop_clean(key, skipped)
    return out


def _split_by_hash(convs: list[Conversation], val_fraction: float,
                   what: str) -> tuple[list[Conversation], list[Conversation]]:
    if len(convs) < 2:
        raise ValueError(f"{what} has {len(convs)} conversation(s): too few to hold out "
                         "validation; add rows or set data.val_path")
    keys = [json.dumps([[m.role, m.content] for m in c]) for c in convs]
    order = hash_order(keys)
    n_val = min(max(1, round(val_fraction * len(convs))), len(convs) - 1)
    val = set(order[:n_val].tolist())
    return ([c for i, c in enumerate(convs) if i not in val],
            [c for i, c in enumerate(convs) if i in val])


def _hub(cfg: DataConfig, hf_cache: Path,
         skipped: dict) -> tuple[list[Conversation], list[Conversation]]:
    from datasets import load_dataset

    fmt, val_split = _HUB[cfg.name]
    fmt = fmt if cfg.format == "auto" else cfg.format
    offline = check_hub(cfg, _OFFLINE)

    def rows(split: str) -> Iterator[tuple[str, dict]]:
        try:
            ds = load_dataset(cfg.hub_dataset, cfg.hub_config, split=split,
                              cache_dir=str(hf_cache))
        except (ConnectionError, OSError) as err:
            raise hub_unreachable(cfg, offline or type(err).__name__, _OFFLINE) from err
        return ((f"{cfg.hub_dataset} {split} row {i + 1}", row) for i, row in enumerate(ds))

    key = f"data={cfg.name}"
    # oasst trees need every row; per-row formats stop at max_samples
    limit = None if fmt == "oasst" else cfg.max_samples
    train = _collect(rows("train"), fmt, key, skipped, limit)
    if not train:
        raise _no_usable(key, skipped)
    if val_split is None:
        train, val = _split_by_hash(train, cfg.val_fraction, key)
    else:
        val = _collect(rows(val_split), fmt, key, skipped, None)
    if not train or not val:
        raise _no_usable(key, skipped)
    _drop_clean(key, skipped)
    return train[: cfg.max_samples], val


def _chat(cfg: DataConfig, hf_cache: Path,
          skipped: dict) -> tuple[list[Conversation], list[Conversation]]:
    train = read_conversation_files(find_files(cfg.path, "data.path"), cfg.format, "data.path",
                                    skipped, cfg.max_samples)
    if cfg.val_path is not None:
        val = read_conversation_files(find_files(cfg.val_path, "data.val_path"), cfg.format,
                                      "data.val_path", skipped)
        return train, val
    return _split_by_hash(train, cfg.val_fraction, f"data.path={cfg.path}")


def _arithmetic(cfg: DataConfig, hf_cache: Path,
                skipped: dict) -> tuple[list[Conversation], list[Conversation]]:
    from h64lm.data.tasks.arithmetic import make_splits

    splits = make_splits()
    convs = {k: [[Message("user", p.question), Message("assistant", p.answer)] for p in v]
             for k, v in splits.items()}
    return convs["train"][: cfg.max_samples], convs["val"]


_SOURCES = {"chat": _chat, "arithmetic": _arithmetic, **{name: _hub for name in _HUB}}


def load_conversations(cfg: DataConfig, hf_cache: Path, skipped: dict | None = None
                       ) -> tuple[list[Conversation], list[Conversation]]:
    """(train, val) conversations of `cfg.name`; rows skipped are counted in `skipped`."""
    if cfg.name not in _SOURCES:
        raise ValueError(f"data={cfg.name} is pretraining text; supervised fine-tuning reads "
                         f"data={' | data='.join(_SOURCES)}")
    return _SOURCES[cfg.name](cfg, hf_cache, {} if skipped is None else skipped)


def encode_conversations(chat: ChatFormat, convs: Sequence[Conversation], seq_len: int,
                         what: str, skipped: dict | None = None) -> list[EncodedChat]:
    """Encode; a conversation longer than one window (`seq_len` input tokens) is skipped and
    counted (cutting it would train on a half answer)."""
    out = [chat.encode(c) for c in convs]
    kept = [e for e in out if len(e.input_ids) <= seq_len]
    if len(kept) < len(out) and skipped is not None:
        skipped[f"{what} longer than data.seq_len"] = {
            "rows": len(out), "skipped": len(out) - len(kept),
            "first": f"{max(len(e.input_ids) for e in out)} tokens at most"}
    if not kept:
        raise ValueError(f"{what}: every conversation is longer than data.seq_len={seq_len} "
                         f"tokens (the shortest has {min(len(e.input_ids) for e in out)}); "
                         "raise data.seq_len")
    return kept
