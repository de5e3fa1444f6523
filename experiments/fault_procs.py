"""Start, watch and kill training processes; compare a recovered run with an uninterrupted one.

Shared by the fault tests and `experiments/faults.py`: the tests assert on what these return,
the script counts it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from h64lm.data.wiki import excerpt_text

ROOT = Path(__file__).resolve().parents[1]

__all__ = [
    "COMPARED",
    "FAST",
    "text_corpus",
    "run_cli",
    "INJECT",
    "TORCHRUN",
    "ResumeLog",
    "differences",
    "final_weights",
    "kill_and_wait",
    "logged_steps",
    "rank_pids",
    "run_losses",
    "start_run",
    "wait_until",
]

INJECT = [sys.executable, str(ROOT / "experiments" / "fault_inject.py")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
            str(ROOT / "experiments" / "fault_inject.py")]
# A few-second training run: the tiny model shrunk further, a short local text corpus.
FAST = [
    "model=tiny",
    "model.hidden_size=32",
    "model.num_layers=2",
    "model.num_attention_heads=2",
    "model.num_kv_heads=1",
    "model.intermediate_size=64",
    "model.moe_intermediate_size=32",
    "model.num_experts=4",
    "data.seq_len=32",
    "data.val_windows=4",
    "train.batch_size=2",
    "train.max_steps=6",
    "train.eval_every=3",
    "train.save_every=3",
    "train.sample_tokens=4",
    "optim.warmup_steps=2",
    # the lr the exactness tolerances (2 processes == 1, layouts, resume) were set at; the default
    # Muon recipe's 1.2e-2 amplifies fp32 summation-order differences 4x faster over a few steps
    "optim.lr=3e-3",
    "hardware=cpu",
    "logger=none",
]


def text_corpus(tmp_path: Path) -> Path:
    """A local .txt corpus of real English (120k characters of the Wikipedia excerpt that ships
    with the repository's requirements), long enough for many 32-token windows."""
    path = tmp_path / "corpus.txt"
    path.write_text(excerpt_text(120_000))
    return path


def _child_env(env: dict[str, str] | None) -> dict[str, str]:
    """The child runs this checkout's code: ROOT leads PYTHONPATH (a relative `PYTHONPATH=.` would
    name the child's working folder, and the editable install may point at another checkout)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **(env or {})}


def run_cli(args: list[str], cwd: Path, timeout: float = 300, env: dict | None = None,
            launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    full_env = _child_env(env)
    cmd = (launcher or [sys.executable]) + [str(ROOT / "run.py")] + args
    return subprocess.run(cmd, cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout)


COMPARED = ("loss", "ce", "aux", "z", "grad_norm", "lr", "tokens")  # the numbers a rerun must match


def start_run(args: list[str], cwd: Path, env: dict[str, str] | None = None,
              launcher: list[str] = INJECT, log_name: str = "proc") -> subprocess.Popen:
    """`run.py args` in the background, its output in `cwd/<log_name>.{out,err}` (no pipe to fill)."""
    full_env = _child_env(env)
    cwd.mkdir(parents=True, exist_ok=True)
    with open(cwd / f"{log_name}.out", "w") as out, open(cwd / f"{log_name}.err", "w") as err:
        return subprocess.Popen(launcher + [str(ROOT / "run.py"), *args], cwd=cwd, env=full_env,
                                stdout=out, stderr=err, start_new_session=True)


def wait_until(ready: Callable[[], bool], proc: subprocess.Popen, timeout: float,
               what: str) -> None:
    """Poll `ready` until true; fail if `proc` ends first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def logged_steps(run_dir: Path) -> int:
    """The newest step in `metrics.jsonl`; a line torn by a kill does not count."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    for line in path.read_text().splitlines():
        try:
            last = max(last, json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return last


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_pids(launcher_pid: int) -> dict[int, int]:
    """{rank: pid} of the worker processes torchrun started (read from /proc)."""
    ranks, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            todo += _children(pid)
        except (FileNotFoundError, ProcessLookupError):
            continue
        env = dict(item.split(b"=", 1) for item in environ if b"=" in item)
        if pid != launcher_pid and b"RANK" in env and b"LOCAL_RANK" in env:
            ranks[int(env[b"RANK"])] = pid
    return ranks


def kill_and_wait(proc: subprocess.Popen, sig: int, timeout: float) -> tuple[int, float]:
    """Send `sig`; (exit code, seconds until it exited). Kills the whole group on a timeout."""
    start = time.monotonic()
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"the process did not exit within {timeout} s of signal {sig}")
    return code, time.monotonic() - start


def run_losses(run_dir: Path) -> dict[int, dict[str, float]]:
    """{step: the numbers of COMPARED} from a run's metrics."""
    from h64lm.train.metrics import read_metrics

    return {r["step"]: {k: r[k] for k in COMPARED} for r in read_metrics(Path(run_dir) / "metrics.jsonl")}


def saved_step(run_dir: Path) -> int:
    """The step of the newest checkpoint of `run_dir` that verifies."""
    from h64lm.runtime.checkpoint import read_extras, resolve

    return read_extras(resolve(run_dir, log=lambda s: None))["step"]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from h64lm.runtime.checkpoint import read_full_state, resolve

    return read_full_state(resolve(run_dir))["model"]


def differences(run_dir: Path, reference_dir: Path) -> list[str]:
    """What differs between a recovered run and the uninterrupted reference (empty: identical)."""
    mine, ref = run_losses(run_dir), run_losses(reference_dir)
    problems = []
    if sorted(mine) != sorted(ref):
        problems.append(f"steps {sorted(set(ref) ^ set(mine))} missing or extra")
    problems += [f"step {s}: {mine[s]} != {ref[s]}" for s in sorted(set(mine) & set(ref))
                 if mine[s] != ref[s]]
    a, b = final_weights(run_dir), final_weights(reference_dir)
    problems += [f"weights differ in {k}" for k in b if k not in a or not torch.equal(a[k], b[k])]
    return problems


class ResumeLog:
    """What `train.resume=auto` printed: the checkpoint it chose and those it skipped."""

    def __init__(self, text: str):
        self.text = text
        self.skipped = [line for line in text.splitlines() if line.startswith("resume: skipping")]
        chosen = [line for line in text.splitlines() if line.startswith("resuming from ")]
        self.step = int(chosen[-1].rsplit("(step ", 1)[1].rstrip(")")) if chosen else 0
