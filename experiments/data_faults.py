"""Data-side faults, shared by experiments/faults.py and tests/faults/test_data_faults.py.

  killed preparation  a `prepare_corpus` with num_proc=2 killed (SIGKILL/SIGTERM) while its
                      `datasets.map` workers tokenize; a new preparation must then finish.
  damaged cache       a token cache or tokenizer cache file cut short, rewritten, emptied or
                      deleted, meta.json invalid or with another dtype; it must be rebuilt.
  bad rows            a .jsonl with a broken line, a non-string text, rows without the field.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

__all__ = ["BAD_ROWS", "CACHE_DAMAGE", "TOKENIZER_DAMAGE", "bad_rows_trials", "children", "damage",
           "damaged_cache_trials", "finish_preparation", "kill_while_tokenizing",
           "killed_preparation_trial", "start_preparation", "workers_left", "write_corpus",
           "write_rows"]

ROOT = Path(__file__).resolve().parents[1]

# The child: prepare `path` into `cache` with `num_proc` tokenizer processes, print the folder.
_PREPARE = """
import sys
sys.path.insert(0, {root!r})
from h64lm.data import DataConfig, load_tokenizer, prepare_corpus
cfg = DataConfig(name="text", path={path!r}, cache_dir={cache!r}, seq_len=32, num_proc={num_proc})
print("corpus", prepare_corpus(cfg, load_tokenizer(cfg)).path, flush=True)
"""


def write_corpus(path: Path, docs: int = 20_000) -> Path:
    """A jsonl corpus (~6 MB): each of 2 map workers tokenizes for ~10 s on 2 busy cores."""
    words = "river stone music winter garden engine market history north light".split()
    with open(path, "w") as f:
        for i in range(docs):
            text = " ".join(words[(i * 7 + k * 3) % len(words)] + str(k % 13) for k in range(40))
            f.write(json.dumps({"text": f"doc {i}: {text}."}) + "\n")
    return path


def start_preparation(path: Path, cache: Path, num_proc: int, log: Path) -> subprocess.Popen:
    code = _PREPARE.format(root=str(ROOT), path=str(path), cache=str(cache), num_proc=num_proc)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True)


def children(pid: int) -> list[int]:
    """The direct children of `pid` (from /proc; empty once it is gone)."""
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def kill_while_tokenizing(proc: subprocess.Popen, cache: Path, num_proc: int, sig: int,
                          timeout: float = 300) -> list[int]:
    """Wait until `proc` has its `num_proc` map workers and a temporary corpus folder, then send
    `sig` to it alone (not its group, so the workers are orphaned as by a real kill). Returns
    the workers' pids."""
    deadline = time.monotonic() + timeout
    while True:
        workers = children(proc.pid)
        building = list((cache / "corpus").glob("*.tmp-*")) if (cache / "corpus").is_dir() else []
        if len(workers) >= num_proc and building:
            break
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the preparation ended (exit {proc.returncode}) or took over "
                               f"{timeout:.0f} s before its {num_proc} workers started")
        time.sleep(0.02)
    os.kill(proc.pid, sig)
    proc.wait(timeout=60)
    return workers


def finish_preparation(path: Path, cache: Path, log: Path, timeout: float = 300
                       ) -> tuple[int | None, float]:
    """Run a new preparation to its end: (exit code, or None on a timeout; seconds)."""
    start = time.monotonic()
    proc = start_preparation(path, cache, 1, log)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        code = None
    return code, time.monotonic() - start


def workers_left(pids: list[int], wait_s: float = 5.0) -> list[int]:
    deadline = time.monotonic() + wait_s
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [p for p in pids if _alive(p)]


def _cut(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _rewrite(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2: len(data) // 2 + 8] = bytes(8 - i for i in range(8))  # same size
    path.write_bytes(bytes(data))


def _retype(path: Path) -> None:
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "dtype": "uint32"}))


# (name, file, how): file is relative to the cache folder.
CACHE_DAMAGE = [
    ("train.bin cut short", "train.bin", _cut),
    ("train.bin rewritten (same size)", "train.bin", _rewrite),
    ("val.bin emptied", "val.bin", lambda p: p.write_bytes(b"")),
    ("meta.json missing", "meta.json", Path.unlink),
    ("meta.json invalid", "meta.json", lambda p: p.write_text("{not json")),
    ("meta.json says uint32", "meta.json", _retype),
    ("manifest.json missing", "manifest.json", Path.unlink),
]
TOKENIZER_DAMAGE = [
    ("tokenizer.json cut short", "tokenizer.json", _cut),
    ("tokenizer.json rewritten", "tokenizer.json", _rewrite),
    ("tokenizer_config.json missing", "tokenizer_config.json", Path.unlink),
]


def damage(folder: Path, file: str, how) -> None:
    how(folder / file)


# (name, rows written one per line, what must happen): "error: <start>" or "skipped: <count>".
BAD_ROWS = [
    ("invalid JSON line", ['{"text": "a b c"}', '{"text": "cut', '{"text": "d"}'],
     "error: line 2 is not valid JSON"),
    ("number in the text field", ['{"text": "a b c"}', '{"text": 42}'],
     "error: line 2: data.text_field='text' holds a int"),
    ("list in the text field", ['{"text": ["a", "b"]}'], "error: line 1: data.text_field='text'"),
    ("a row that is no object", ['{"text": "a"}', '[1, 2]'], "error: line 2 is a JSON list"),
    ("a quarter of the rows without the field", None, "skipped: 25"),
]


def write_rows(path: Path, rows: list[str] | None, docs: list[str]) -> Path:
    """`rows` as lines, or (None) `docs` as rows with every fourth one lacking the field."""
    if rows is None:
        rows = [json.dumps({"text": d} if i % 4 else {"title": d}) for i, d in enumerate(docs)]
    path.write_text("\n".join(rows) + "\n")
    return path


def killed_preparation_trial(workdir: Path, sig: int) -> tuple[bool, str]:
    """One kill of a num_proc=2 preparation mid-tokenization, then a new one: (ok, note)."""
    corpus, cache = write_corpus(workdir / "corpus.jsonl"), workdir / "cache"
    proc = start_preparation(corpus, cache, 2, workdir / "killed.log")
    workers = kill_while_tokenizing(proc, cache, 2, sig)
    left = workers_left(workers, wait_s=3)
    code, seconds = finish_preparation(corpus, cache, workdir / "again.log", timeout=300)
    leftovers = [p.name for p in (cache / "corpus").iterdir() if ".tmp-" in p.name]
    ok = not left and code == 0 and not leftovers
    return ok, (f"{signal.Signals(sig).name} mid-tokenize: {len(left)} workers left, next "
                f"preparation {'exit ' + str(code) if code is not None else 'HUNG'} in "
                f"{seconds:.0f} s, {len(leftovers)} temp folders")


def _documents(n: int) -> list[str]:
    words = "river stone music winter garden engine market history".split()
    return [f"doc {i}: " + " ".join(words[(i * 7 + k * 3) % 8] for k in range(40)) for i in range(n)]


def damaged_cache_trials(workdir: Path) -> list[tuple[bool, str]]:
    """Each CACHE_DAMAGE / TOKENIZER_DAMAGE case: rebuilt, one `cache:` line, the same data."""
    import contextlib
    import io

    import numpy as np

    from h64lm.data import DataConfig, load_tokenizer, prepare_corpus

    path = write_rows(workdir / "docs.jsonl", [json.dumps({"text": d}) for d in _documents(60)], [])
    cfg = DataConfig(name="text", path=str(path), seq_len=16, cache_dir=str(workdir / "cache"))
    tokenizer = load_tokenizer(cfg)
    reference = prepare_corpus(cfg, tokenizer)
    ids = np.concatenate([reference.train, reference.val]).copy()
    tok_folder = next(p for p in (workdir / "cache" / "tokenizers").iterdir() if p.is_dir())
    results = []
    for name, file, how in CACHE_DAMAGE + TOKENIZER_DAMAGE:
        folder = reference.path if (name, file, how) in CACHE_DAMAGE else tok_folder
        damage(folder, file, how)
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            again = prepare_corpus(cfg, load_tokenizer(cfg))
        lines = [x for x in err.getvalue().splitlines() if x.startswith("cache:")]
        same = np.array_equal(np.concatenate([again.train, again.val]), ids)
        ok = len(lines) == 1 and f"{folder} is damaged" in lines[0] and same
        results.append((ok, name + ("" if ok else f": {lines or 'not noticed'}, same={same}")))
    return results


def bad_rows_trials(workdir: Path) -> list[tuple[bool, str]]:
    """Each BAD_ROWS case and an unset `$VAR` in data.path: one line, or a count in meta.json."""
    from h64lm.data import DataConfig, load_tokenizer, prepare_corpus

    results = []
    for i, (name, rows, expect) in enumerate(BAD_ROWS):
        path = write_rows(workdir / f"rows{i}.jsonl", rows, _documents(100))
        try:
            cfg = DataConfig(name="text", path=str(path), seq_len=16,
                             cache_dir=str(workdir / "cache"))
            corpus = prepare_corpus(cfg, load_tokenizer(cfg))
            outcome = f"skipped: {corpus.meta['skipped']['data.path']['no_text']}"
        except ValueError as e:
            outcome = "error: " + str(e) if "\n" not in str(e) else "several lines"
        ok = outcome.startswith(expect.split(": ", 1)[0]) and expect.split(": ", 1)[1] in outcome
        results.append((ok, name + ("" if ok else f": {outcome[:80]!r}")))
    os.environ.pop("H64LM_FAULT_UNSET", None)
    try:
        DataConfig(name="text", path="$H64LM_FAULT_UNSET/x.jsonl")
        results.append((False, "unset $VAR accepted"))
    except ValueError as e:
        results.append(("$H64LM_FAULT_UNSET is not set" in str(e), "unset $VAR refused"))
    return results
