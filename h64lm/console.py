"""What a run prints is also its record: `Tee` copies the console into `RUN/run.log`, and
`final_summary_line` is the one line a run ends with."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import IO, Any

__all__ = ["Tee", "final_summary_line"]


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


def final_summary_line(run_dir: Path, summary: dict[str, Any]) -> str:
    def loss(key: str) -> str:
        v = summary.get(key)
        return "n/a" if v is None or not math.isfinite(v) else f"{v:.4f} (ppl {math.exp(min(v, 50)):.1f})"

    return (f"done: {run_dir}  best val loss {loss('best_val_loss')}, final {loss('final_val_loss')}, "
            f"{summary['step']} steps.  Evaluate: python run.py mode=eval checkpoint={run_dir}  "
            f"Generate: python run.py mode=generate checkpoint={run_dir} prompt=\"...\"  "
            f"Report: python experiments/report.py {run_dir.parent}")
