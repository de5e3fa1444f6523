"""Which checkpoint a training launch starts from, and the refusals that protect a run's outputs.

- `train.resume=null`: a fresh run; refused in a directory that already holds a run's outputs.
- `train.resume=auto`: the newest checkpoint that verifies (`last.pt`, step files, then `best.pt`);
  where none verifies but the directory holds outputs, refused naming what was found, never a
  silent restart that would overwrite `best.pt` and append steps 1..N to `metrics.jsonl`.
- `train.resume=PATH`: that checkpoint file, sharded checkpoint directory or run directory.

A sharded directory (FSDP / expert-parallel runs) is read here only for its plain data (step,
config, loader, ...: `extras/rank_0.pt`) plus `sharded_path`; the weights and optimizer state are
loaded later, collectively, into whatever layout the resuming run has (h64lm/train/sharded.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from h64lm.train.checkpoint import (
    CheckpointError,
    find_resume_checkpoint,
    is_sharded_checkpoint,
    load_trusted,
    resolve_checkpoint_path,
    verify_checkpoint,
)
from h64lm.validation import ConfigError

__all__ = ["find_resume_state", "run_outputs", "load_checkpoint_state"]

_OUTPUTS = ("checkpoints/*.pt", "checkpoints/step_*", "checkpoints/best", "metrics.jsonl",
            "best_model.safetensors", "training_history.json")


def run_outputs(run_dir: Path) -> list[str]:
    """The training outputs present in `run_dir`, relative names."""
    found = []
    for pattern in _OUTPUTS:
        found += sorted(str(p.relative_to(run_dir)) for p in Path(run_dir).glob(pattern))
    return found


def find_resume_state(resume: str | None, run_dir: Path, max_steps: int,
                      log: Callable[[str], None]) -> dict[str, Any] | None:
    run_dir = Path(run_dir)
    if resume is None:
        outputs = run_outputs(run_dir)
        if outputs:
            raise ConfigError(
                f"{run_dir} already holds a run ({', '.join(outputs[:3])}); set train.resume=auto to "
                "continue it, or choose a new hydra.run.dir (nothing was overwritten)")
        return None
    if resume == "auto":
        path = find_resume_checkpoint(run_dir / "checkpoints", log=log, include_best=True)
        if path is None:
            outputs = run_outputs(run_dir)
            if outputs:
                raise CheckpointError(
                    f"train.resume=auto: no checkpoint in {run_dir / 'checkpoints'} verifies, but the "
                    f"directory holds a run ({', '.join(outputs[:4])}); refusing to restart it from step 0. "
                    "Resume from a file with train.resume=PATH, or train in a new hydra.run.dir")
            log(f"train.resume=auto: {run_dir} holds no run yet (a new directory), so training starts at "
                "step 0; to continue an earlier run, pass its directory: hydra.run.dir=RUN_DIR")
            return None
    else:
        try:
            path = resolve_checkpoint_path(resume)
        except CheckpointError as e:
            raise ConfigError(f"train.resume={resume}: {e}") from None
    state = load_checkpoint_state(path, log)
    if state["step"] >= max_steps:
        raise ConfigError(
            f"{path} is already at step {state['step']} >= train.max_steps={max_steps}: nothing to train; "
            "raise train.max_steps to continue (optim.schedule_steps keeps the decayed learning rate)")
    log(f"resuming from {path} (step {state['step']})")
    return state


def load_checkpoint_state(path: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    """A checkpoint file's whole state, or a sharded directory's plain data + `sharded_path`."""
    if not is_sharded_checkpoint(path):
        return load_trusted(path, log)
    verify_checkpoint(path)
    extras = torch.load(Path(path) / "extras" / "rank_0.pt", map_location="cpu", weights_only=True)
    return {**extras, "sharded_path": str(path)}
