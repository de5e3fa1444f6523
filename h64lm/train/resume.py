"""Which checkpoint a training launch starts from, and the refusals that protect a run's outputs.

- `train.resume=null`: a fresh run; refused in a directory that already holds a run's outputs.
- `train.resume=auto`: the newest checkpoint that verifies (what `last` names, every step entry,
  then `best`), one line for each one skipped and why; where none verifies but the directory holds
  outputs, refused naming what was found, never a silent restart that would overwrite `best` and
  append steps 1..N to `metrics.jsonl`.
- `train.resume=PATH`: that checkpoint (any layout, verified) or run directory.

Only the plain data (rank 0's extras: step, config, ...) is read here, plus `checkpoint_path`;
the weights and optimizer state are loaded later, collectively, into whatever layout the
resuming run has (`Checkpointer.load`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from h64lm.runtime.checkpoint import CheckpointError, find_newest, read_extras, resolve
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
        path = find_newest(run_dir / "checkpoints", log=log, include_best=True)
        if path is None:
            outputs = run_outputs(run_dir)
            if outputs:
                raise CheckpointError(
                    f"train.resume=auto: no checkpoint in {run_dir / 'checkpoints'} verifies, but the "
                    f"directory holds a run ({', '.join(outputs[:4])}); refusing to restart it from step 0. "
                    "Resume from a checkpoint with train.resume=PATH, or train in a new hydra.run.dir")
            log(f"train.resume=auto: {run_dir} holds no run yet (a new directory), so training starts at "
                "step 0; to continue an earlier run, pass its directory: hydra.run.dir=RUN_DIR")
            return None
    else:
        try:
            path = resolve(resume, log)
        except CheckpointError as e:
            if not Path(resume).exists():
                raise ConfigError(f"train.resume={resume}: {e}") from None
            raise CheckpointError(f"train.resume={resume}: {e}") from None
    state = load_checkpoint_state(path)
    if state["step"] >= max_steps:
        raise ConfigError(
            f"{path} is already at step {state['step']} >= train.max_steps={max_steps}: nothing to train; "
            "raise train.max_steps to continue (optim.schedule_steps keeps the decayed learning rate)")
    log(f"resuming from {path} (step {state['step']})")
    return state


def load_checkpoint_state(path: Path) -> dict[str, Any]:
    """A verified checkpoint's plain data (rank 0's) and `checkpoint_path`."""
    return {**read_extras(Path(path)), "checkpoint_path": str(path)}
