"""Preference pairs for reward-model and DPO stages: a prompt, a chosen and a rejected answer.

Sources (`data.name`):
  preference_arithmetic  offline default: problems of the arithmetic task's train split
                         (h64lm/data/tasks/arithmetic.py, the task of `data=arithmetic`, whose test
                         split exact match scores), a correct worked solution against the same
                         solution with a wrong result (`arithmetic_pairs(source=task_problems)`).
  preference             local `.jsonl` / `.parquet` files at data.path (data.val_path, else
                         data.val_fraction of the prompts held out by hash).
  ultrafeedback, hh_rlhf the hub datasets (`data.hub_dataset`); offline they fail at once.

Row shapes read from files or the hub, all normalised to `PreferencePair`:
  strings        {"prompt": str, "chosen": str, "rejected": str}
  conversations  chosen / rejected are message lists [{"role", "content"}] whose last turn is the
                 assistant's answer (UltraFeedback); the turns before it are the prompt and must
                 be the same in both; an optional "prompt" (a string: the last user turn, or a
                 message list: the leading turns) must agree with them.
  HH-RLHF        chosen / rejected are transcripts "\\n\\nHuman: ...\\n\\nAssistant: ...", parsed
                 into turns.
A row that is not a JSON object, or a field of the wrong type, stops the run naming its file and
line. A half-parsed pair is skipped and counted by reason (see `SKIP_REASONS`), never trained on.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from h64lm.data.config import DataConfig
from h64lm.data.files import find_files
from h64lm.data.sources import _hub_offline_reason, hub_available

__all__ = ["LoadedPairs", "PreferencePair", "ProblemSource", "SKIP_REASONS", "arithmetic_pairs", "load_pairs",
           "pair_from_row", "parse_hh", "read_pair_files", "split_pairs", "sum_problems", "task_problems"]

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
ROLES = ("system", "user", "assistant")
SKIP_REASONS = {
    "unparseable": "an HH-RLHF transcript without Human/Assistant turns",
    "no_prompt": "no prompt turn before the answer",
    "not_assistant": "the last turn is not the assistant's",
    "empty_answer": "an empty chosen or rejected answer",
    "identical": "chosen == rejected",
    "prompt_mismatch": "chosen and rejected continue different prompts",
}
# hub preset -> (train split, validation split)
HUB_SPLITS = {"ultrafeedback": ("train_prefs", "test_prefs"), "hh_rlhf": ("train", "test")}
DEFAULT_ARITHMETIC_PAIRS = 2000
_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
_HH_HUMAN = re.compile(r"(?:^|\n\n)Human:")


@dataclass(frozen=True)
class PreferencePair:
    prompt: tuple  # of Message: the conversation so far, ending with a user turn
    chosen: str  # the preferred assistant answer
    rejected: str  # the dispreferred one

    def conversation(self, which: str) -> list[Message]:
        """The prompt turns + the `which` ("chosen" / "rejected") answer as an assistant turn,
        ready for chat formatting."""
        return [dict(m) for m in self.prompt] + [{"role": "assistant",
                                                    "content": getattr(self, which)}]


class _Skip(Exception):
    """A row that parsed but is not a usable pair; `args[0]` is a SKIP_REASONS key."""


def parse_hh(text: str) -> list[Message]:
    """An HH-RLHF transcript -> its turns; _Skip("unparseable") when text precedes the first turn
    or there is no turn at all."""
    parts = _HH_TURN.split(text)  # [before, speaker, content, speaker, content, ...]
    if parts[0].strip() or len(parts) < 3:
        raise _Skip("unparseable")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content.strip()}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def _is_hh(text: str) -> bool:
    """Looks like an HH-RLHF transcript: a Human turn opens the text or follows a blank line."""
    return _HH_HUMAN.search(text.lstrip()) is not None


def _messages(value: Any, name: str) -> list[Message]:
    """A message list from a row, type-checked (TypeError names the field)."""
    out = []
    for i, m in enumerate(value):
        if (not isinstance(m, dict) or m.get("role") not in ROLES
                or not isinstance(m.get("content"), str)):
            raise TypeError(f"{name}[{i}] is not a message {{'role': one of {'/'.join(ROLES)}, "
                            f"'content': str}}: {json.dumps(m)[:60]}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _prompt_turns(row: dict) -> list[Message] | None:
    prompt = row.get("prompt")
    if prompt is None:
        return None
    if isinstance(prompt, list):
        return _messages(prompt, "prompt")
    if not isinstance(prompt, str):
        raise TypeError(f"prompt is a {type(prompt).__name__}, not a string or message list")
    return parse_hh(prompt) if _is_hh(prompt) else [{"role": "user", "content": prompt}]


def _conversation(row: dict, name: str, prompt: list[Message] | None) -> list[Message]:
    """The full conversation that `row[name]` (chosen or rejected) ends."""
    value = row.get(name)
    if isinstance(value, str):
        if prompt is None:
            if not _is_hh(value):
                raise _Skip("no_prompt")
            return parse_hh(value)
        if _is_hh(value):  # a transcript continuing the prompt's transcript
            turns = parse_hh(value)
            return turns if turns[:len(prompt)] == prompt else prompt + turns
        return prompt + [{"role": "assistant", "content": value}]
    if isinstance(value, list):
        turns = _messages(value, name)
        full = any(m["role"] == "user" for m in turns)  # a whole conversation, not answer turns
        # a string prompt is checked against the conversation's last user turn in pair_from_row
        if prompt is None or turns[:len(prompt)] == prompt or (full and isinstance(row["prompt"], str)):
            return turns
        if full:  # a whole conversation continuing another prompt
            raise _Skip("prompt_mismatch")
        return prompt + turns  # the answer turn(s) only, as TRL's conversational format
    raise TypeError(f"{name} is {'missing' if value is None else 'a ' + type(value).__name__}, "
                    "not a string or message list")


def pair_from_row(row: dict) -> PreferencePair:
    """One row of any supported shape -> a pair; TypeError for a malformed field, _Skip for a
    pair that must not be trained on."""
    prompt = _prompt_turns(row)
    chosen, rejected = _conversation(row, "chosen", prompt), _conversation(row, "rejected", prompt)
    for conv in (chosen, rejected):
        if conv[-1]["role"] != "assistant":
            raise _Skip("not_assistant")
        if not any(m["role"] == "user" for m in conv[:-1]):
            raise _Skip("no_prompt")
        if not conv[-1]["content"].strip():
            raise _Skip("empty_answer")
    if chosen[:-1] != rejected[:-1]:
        raise _Skip("prompt_mismatch")
    if prompt is not None and isinstance(row["prompt"], str) and not _is_hh(row["prompt"]):
        last_user = [m["content"] for m in chosen[:-1] if m["role"] == "user"][-1]
        if last_user.strip() != row["prompt"].strip():
            raise _Skip("prompt_mismatch")
    if chosen[-1]["content"].strip() == rejected[-1]["content"].strip():
        raise _Skip("identical")
    return PreferencePair(tuple(chosen[:-1]), chosen[-1]["content"], rejected[-1]["content"])


def _file_rows(path: Path, key: str) -> Iterator[tuple[str, Any]]:
    """(where, row) of a .jsonl or .parquet file; invalid JSON stops naming file and line."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), 1):
            yield f"{path} row {number}", row
        return
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"{path} line {number}", json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{key}={path}: line {number} is not valid JSON ({err.msg} at "
                                 f"column {err.colno}); fix or delete that line") from None


def _collect(rows: Iterable[tuple[str, Any]], key: str,
             skipped: dict) -> list[PreferencePair]:
    """Pairs of `rows` ((where, row) items); skips are counted in skipped[key]."""
    pairs: list[PreferencePair] = []
    reasons: dict[str, int] = {}
    first: str | None = None
    total = 0
    for where, row in rows:
        total += 1
        if not isinstance(row, dict):
            raise ValueError(f"{key}: {where} is a JSON {type(row).__name__}, not an object "
                             "with prompt/chosen/rejected")
        try:
            pairs.append(pair_from_row(row))
        except TypeError as err:
            raise ValueError(f"{key}: {where}: {err}; fix the row") from None
        except _Skip as skip:
            reasons[skip.args[0]] = reasons.get(skip.args[0], 0) + 1
            first = first or where
    if reasons:
        skipped[key] = {"rows": total, "reasons": reasons, "first": first}
    if not pairs:
        why = (f"; all {total} rows skipped, most for: "
               f"{SKIP_REASONS[max(reasons, key=reasons.get)]} (first: {first})" if reasons else "")
        raise ValueError(f"{key} holds no usable preference pair{why}")
    return pairs


def read_pair_files(path: str, key: str, skipped: dict) -> list[PreferencePair]:
    """The pairs of a .jsonl/.parquet file or folder at `path` (config key `key`)."""
    files = find_files(path, key)
    if files[0].suffix not in (".jsonl", ".parquet"):
        raise ValueError(f"{key}={path}: preference pairs are read from .jsonl or .parquet files, "
                         f"not {files[0].suffix}")
    return _collect((item for p in files for item in _file_rows(p, key)), key, skipped)


def split_pairs(pairs: list[PreferencePair], val_fraction: float
                ) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, val): prompts in the order of a hash of their text go to validation until it holds
    `val_fraction` of the pairs; every pair of one prompt lands on the same side, on any machine."""
    def digest(pair: PreferencePair) -> str:
        return hashlib.sha1(json.dumps(pair.prompt, sort_keys=True).encode()).hexdigest()

    by_prompt: dict[str, list[PreferencePair]] = {}
    for pair in pairs:
        by_prompt.setdefault(digest(pair), []).append(pair)
    train: list[PreferencePair] = []
    val: list[PreferencePair] = []
    for key in sorted(by_prompt):
        (val if len(val) < val_fraction * len(pairs) else train).extend(by_prompt[key])
    return train, val


ProblemSource = Callable[[random.Random], tuple[str, str, str]]  # -> (question, solution, answer)


def sum_problems(rng: random.Random) -> tuple[str, str, str]:
    """A small local problem source: a + b - c worked in two lines, GSM8K's `#### answer` last."""
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(1, 50)
    s = a + b
    question = f"Sam has {a} marbles, wins {b} more and gives {c} away. How many are left?"
    return question, f"{a} + {b} = {s}\n{s} - {c} = {s - c}\n#### {s - c}", str(s - c)


def task_problems(rng: random.Random) -> tuple[str, str, str]:
    """A problem drawn from the arithmetic task's train split (disjoint from its test split): the
    pairs of `data=preference_arithmetic` teach the task that `sft/exact_match` measures."""
    problem = rng.choice(_task_train())
    return problem.question, problem.answer, str(problem.result)


@functools.lru_cache(maxsize=1)
def _task_train() -> list:
    from h64lm.data.tasks.arithmetic import make_splits

    return make_splits()["train"]


def _wrong(solution: str, answer: str, rng: random.Random) -> str:
    """The solution with its final result replaced by a wrong number wherever the result is
    stated last (the final line of work and the `####` line)."""
    wrong = str(int(answer) + rng.choice([-1, 1]) * rng.randint(1, 9))
    lines = solution.split("\n")
    for i in (len(lines) - 2, len(lines) - 1):
        if i >= 0:
            head, sep, tail = lines[i].rpartition(answer)
            lines[i] = head + wrong + tail if sep else lines[i]
    return "\n".join(lines)


def arithmetic_pairs(count: int, seed: int,
                     source: ProblemSource = sum_problems) -> list[PreferencePair]:
    """`count` pairs from `source`: chosen = the worked solution, rejected = the same work with a
    wrong result. The same (count, seed, source) gives the same pairs everywhere."""
    rng = random.Random(seed)
    pairs = []
    for _ in range(count):
        question, solution, answer = source(rng)
        pairs.append(PreferencePair(({"role": "user", "content": question},), solution,
                                    _wrong(solution, answer, rng)))
    return pairs


def _hub_unreachable(cfg: DataConfig, reason: str) -> RuntimeError:
    return RuntimeError(
        f"data={cfg.name} reads {cfg.hub_dataset} from the Hugging Face hub, which is unreachable "
        f"({reason}). Offline alternatives: data=preference_arithmetic (generated pairs) or "
        "data.name=preference data.path=<.jsonl/.parquet file or folder of pairs>")


def _hub_pairs(cfg: DataConfig, hf_cache: Path, skipped: dict):
    from datasets import load_dataset

    offline = _hub_offline_reason()
    if offline is None and not hub_available():
        raise _hub_unreachable(cfg, "no connection")
    out = []
    for split in HUB_SPLITS[cfg.name]:
        try:
            rows = load_dataset(cfg.hub_dataset, cfg.hub_config, split=split,
                                cache_dir=str(hf_cache))
        except (ConnectionError, OSError) as err:
            # offline mode still finds a split `datasets` cached earlier; anything else fails
            raise _hub_unreachable(cfg, offline or type(err).__name__) from err
        if cfg.max_samples is not None:
            rows = rows.select(range(min(cfg.max_samples, len(rows))))
        out.append(_collect(((f"{split} row {i + 1}", r) for i, r in enumerate(rows)),
                            f"data={cfg.name} ({split})", skipped))
    return out[0], out[1]


@dataclass
class LoadedPairs:
    train: list[PreferencePair]
    val: list[PreferencePair]
    skipped: dict = field(default_factory=dict)  # config key -> {rows, reasons, first}


def load_pairs(cfg: DataConfig, hf_cache: Path, seed: int = 0) -> LoadedPairs:
    """The (train, val) pairs of `cfg.name` (one of PREFERENCE_SOURCES)."""
    skipped: dict = {}
    if cfg.name == "preference_arithmetic":
        pairs = arithmetic_pairs(cfg.max_samples or DEFAULT_ARITHMETIC_PAIRS, seed, task_problems)
        return LoadedPairs(*split_pairs(pairs, cfg.val_fraction))
    if cfg.name == "preference":
        pairs = read_pair_files(cfg.path, "data.path", skipped)
        if cfg.val_path is not None:
            val = read_pair_files(cfg.val_path, "data.val_path", skipped)
            return LoadedPairs(pairs, val, skipped)
        return LoadedPairs(*split_pairs(pairs, cfg.val_fraction), skipped)
    if cfg.name in HUB_SPLITS:
        return LoadedPairs(*_hub_pairs(cfg, hf_cache, skipped), skipped)
    raise ValueError(f"data={cfg.name} is not a preference source; expected one of "
                     f"preference_arithmetic, preference, {', '.join(HUB_SPLITS)}")
