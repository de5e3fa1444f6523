"""Where metrics go on rank 0: `metrics.jsonl` (every logged step), `training_history.json`
(one entry per evaluation, the original project's format) and the plots drawn from them."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from h64lm.model.moe import plot_load_heatmap

__all__ = ["MetricsFile", "History", "plot_run", "read_metrics"]


def _parse(line: str) -> dict[str, Any] | None:
    """One record, or None for a line a killed writer left torn (or any non-record line)."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsFile:
    """Append-only JSON lines. Opened at step k (a resume, or 0 for a fresh run), it first drops
    the records past k and any line torn by a kill, so the file reads as one uninterrupted run."""

    def __init__(self, path: Path, resume_step: int = 0):
        self.path = Path(path)
        if self.path.exists():
            records = [r for r in map(_parse, self.path.read_text().splitlines()) if r is not None]
            kept = [r for r in records if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._f = open(self.path, "a")

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [r for r in map(_parse, path.read_text().splitlines()) if r is not None]


class History:
    """Per-evaluation train/validation loss and learning rate (`training_history.json`)."""

    KEYS = ("step", "tokens", "train_loss", "val_loss", "val_ppl", "learning_rate")

    def __init__(self, entries: dict[str, list] | None = None):
        self.data = {k: list((entries or {}).get(k, [])) for k in self.KEYS}

    def add(self, **values: float) -> None:
        for k in self.KEYS:
            self.data[k].append(values[k])

    def best_val_loss(self) -> float:
        return min(self.data["val_loss"], default=math.inf)

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.data, indent=1))


def plot_run(run_dir: Path, records: list[dict[str, Any]], history: History) -> list[Path]:
    """`loss.png` (train and validation loss against step) and `expert_load.png` (each expert's load
    over its mean, per MoE layer, over steps, on a log scale centred at 1 = balanced)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in records], [r["loss"] for r in records], lw=0.8, label="train")
    ax.plot(history.data["step"], history.data["val_loss"], "o-", label="validation")
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{run_dir.name}: loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run_dir / "loss.png", dpi=110)
    plt.close(fig)
    written.append(run_dir / "loss.png")

    if any(r.get("router") for r in records):  # one heat map: load / mean per expert and layer over steps
        plot_load_heatmap(records, run_dir / "expert_load.png")
        written.append(run_dir / "expert_load.png")
    return written
