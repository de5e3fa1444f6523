"""What a run prints is also its record: `Tee` copies the console into `RUN/run.log`, and
`final_summary_line` is the one line a run ends with.

Every command a run prints as a hint is built by `command` from Hydra overrides: each argument
is shell-quoted, and a path is a Hydra quoted string when it holds characters that Hydra's
override grammar reads as syntax (a comma would start a sweep), so the line works when pasted.
"""

from __future__ import annotations

import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import IO, Any, Optional, Sequence

__all__ = ["Tee", "final_summary_line", "command", "hydra_value", "launcher", "continue_command"]


class _TeeStream:
    def __init__(self, stream: IO[str], copy: IO[str]):
        self.stream, self.copy = stream, copy

    def write(self, text: str) -> int:
        # Progress-bar redraws (carriage returns) stay on the terminal; lines go to both.
        if "\r" not in text:
            self.copy.write(text)
            self.copy.flush()
        return self.stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.stream, name)


class Tee:
    """Within the block, stdout and stderr also go to `file` (closed at the end)."""

    def __init__(self, file: IO[str]):
        self.file = file

    def __enter__(self) -> "Tee":
        self._saved = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _TeeStream(sys.stdout, self.file), _TeeStream(sys.stderr, self.file)
        return self

    def __exit__(self, *exc) -> None:
        sys.stdout, sys.stderr = self._saved
        self.file.close()


def hydra_value(value: str | Path) -> str:
    """`value` as a Hydra override value: as it is when plain, else a double-quoted string."""
    value = str(value)
    if re.fullmatch(r"[\w/.:-]+", value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def command(args: Sequence[str], prefix: str = "python run.py") -> str:
    """`prefix` then each argument shell-quoted: the line a user pastes."""
    return prefix + "".join(" " + shlex.quote(a) for a in args)


def launcher(environ: Optional[dict] = None) -> str:
    """How this process was started: `python run.py`, or torchrun with this job's process counts."""
    env = os.environ if environ is None else environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world == 1 and "TORCHELASTIC_RUN_ID" not in env:
        return "python run.py"
    per_node = int(env.get("LOCAL_WORLD_SIZE", world))
    nodes = f"--nnodes={world // per_node} " if world > per_node else ""
    return f"torchrun {nodes}--nproc_per_node={per_node} run.py"


_NOT_KEPT = ("train.resume=", "hydra.run.dir=", "hydra.sweep.", "hydra.job.")


def continue_command(overrides: Sequence[str], run_dir: Path, prefix: str = "python run.py") -> str:
    """The command that continues a stopped run: its own overrides (a sweep job's included), then
    train.resume=auto in its own directory."""
    kept = [o for o in overrides if not o.lstrip("+~").startswith(_NOT_KEPT)]
    return command(kept + ["train.resume=auto", f"hydra.run.dir={hydra_value(run_dir)}"], prefix)


def final_summary_line(run_dir: Path, summary: dict[str, Any], sweep_dir: str | Path | None = None) -> str:
    """The closing line: losses, steps, and the commands that evaluate, sample and report this run
    (the report covers its sweep when it is a sweep job, else this run alone)."""
    def loss(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f} (ppl {math.exp(min(v, 50)):.1f})"

    checkpoint = f"checkpoint={hydra_value(run_dir)}"
    return (f"done: {run_dir}  best val loss {loss('best_val_loss')}, final {loss('final_val_loss')}, "
            f"{summary['step']} steps.  Evaluate: {command(['mode=eval', checkpoint])}  "
            f"Generate: {command(['mode=generate', checkpoint, 'prompt=The history of'])}  "
            f"Report: {command([str(sweep_dir or run_dir)], 'python experiments/report.py')}")
