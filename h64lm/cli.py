"""What `python run.py` does with a composed config: train, eval, generate or plan.

Exit codes: 0 done; 2 bad configuration or input (one line on stderr says which option to
change); 3 training diverged (NaN/Inf, last good state saved); 4 a checkpoint could not be
written or trusted; 5 another process of a DDP job died; 128 + N stopped by signal N after
saving a checkpoint (130 SIGINT, 143 SIGTERM). `HYDRA_FULL_ERROR=1` shows the full traceback
instead of the one line.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from h64lm.config import CONF_DIR, RunConfig, build_run_config, did_you_mean, is_schema_key
from h64lm.cpu_threads import starvation_note
from h64lm.runtime.checkpoint import CheckpointError
from h64lm.runtime.console import Tee, continue_command, final_summary_line, launcher
from h64lm.runtime.control import TrainingDiverged, TrainingStopped
from h64lm.runtime.distributed import Dist, PeerFailure, broadcast_object, init_distributed, is_peer_failure
from h64lm.runtime.rundir import RunDirLock, adopt_launch_record, discard_launch
from h64lm.train.wandb_sink import check_can_log
from h64lm.validation import ConfigError

__all__ = ["main", "run", "check_command_line", "mistyped_key", "unwritable_output", "EXIT_CODES"]

EXIT_BAD_INPUT, EXIT_DIVERGED, EXIT_CHECKPOINT, EXIT_PEER = 2, 3, 4, 5
EXIT_CODES = [
    (TrainingDiverged, EXIT_DIVERGED),
    (CheckpointError, EXIT_CHECKPOINT),
    (PeerFailure, EXIT_PEER),
    # any other OSError (a folder made read-only under a running job, ...): one line, not a traceback
    ((ConfigError, ValueError, OSError), EXIT_BAD_INPUT),
]


def _hydra_run_info() -> tuple[Path, list[str], str | None, Path | None]:
    """(run directory, command-line overrides, sweep directory, this launch's record folder)."""
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    sweep_dir = hc.sweep.dir if hc.mode == RunMode.MULTIRUN else None
    return run_dir, list(hc.overrides.task), sweep_dir, run_dir / hc.output_subdir if hc.output_subdir else None


def check_command_line(argv: list[str]) -> None:
    """One line (exit 2) instead of Hydra's traceback or listing: `-m` with `--cfg`, and a mistyped
    key that is close to a real one (`model.hiden_size=1`: did you mean model.hidden_size?)."""
    flags = {"--multirun": "-m", "-m": "-m", "--cfg": "--cfg", "-c": "--cfg", "--info": "--info"}
    given = sorted({flags[a] for a in argv[1:] if a in flags})
    if len(given) > 1:
        print(f"error: {' and '.join(given)} cannot be combined; to see each job's config, run without -m "
              "(python run.py --cfg job OVERRIDES)", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    message = mistyped_key(argv[1:]) or unwritable_output(argv[1:])
    if message:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def unwritable_output(args: list[str]) -> str | None:
    """Hydra creates the run folder (and its `.hydra/`) before any of our code runs, and reports a
    read-only one as a traceback: check the folder it will write under first. The nearest existing
    ancestor of `hydra.run.dir` / `hydra.sweep.dir` (or of `outputs/` here) must be writable."""
    given = dict(a.partition("=")[::2] for a in args if a.startswith(("hydra.run.dir=", "hydra.sweep.dir=")))
    targets = {k: Path(v) for k, v in given.items() if "${" not in v} or {"the output folder": Path("outputs")}
    for key, target in targets.items():
        existing = next(p for p in [target, *target.absolute().parents] if p.exists())
        if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
            return (f"{existing} is not writable (read-only or no permission), so the run cannot write "
                    f"{target}; set {key if key.startswith('hydra') else 'hydra.run.dir'}=<a writable folder>")
    return None


def mistyped_key(args: list[str]) -> str | None:
    """'model.hiden_size is not a configuration key; did you mean model.hidden_size?' for the first
    `key=value` whose key is neither in the schema nor a config group but close to one; None when
    there is none (keys with `+`/`~`, Hydra's own and unknown ones far from any are Hydra's to judge;
    `+group.key` is checked after composing, by `build_run_config`)."""
    groups = tuple(sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir()))
    for arg in args:
        key, sep, _ = arg.partition("=")
        if arg.startswith("-") or not sep or key.startswith(("+", "~", "hydra")) or "/" in key:
            continue
        if key in groups or is_schema_key(key):
            continue
        guess = did_you_mean(key, groups)
        if guess:
            return f"{key} is not a configuration key; did you mean {guess}? (python run.py --cfg job lists them)"
    return None


def _model_choice() -> str:
    """The `model=` option chosen on the command line (named in mode=plan's launch commands)."""
    if not HydraConfig.initialized():
        return "model"
    return HydraConfig.get().runtime.choices.get("model") or "model"


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    return f"warning: {message}\n"


def main(cfg: DictConfig) -> float | None:
    """Hydra's task function: run, turning expected failures into one line and an exit code."""
    warnings.formatwarning = _one_line_warning
    run_dir, overrides, sweep_dir, launch_dir = _hydra_run_info()
    run_dir.mkdir(parents=True, exist_ok=True)
    created = not any(p for p in run_dir.rglob("*") if p.is_file() and launch_dir not in p.parents)
    is_main = int(os.environ.get("RANK", "0")) == 0
    if not is_main:  # every rank composes the same config: rank 0 says it once
        warnings.simplefilter("ignore")
    log_file = open(run_dir / "run.log", "a") if is_main else None
    with Tee(log_file) if log_file else contextlib.nullcontext():
        try:
            model_name = _model_choice()
            return run(_checked(cfg), run_dir, overrides, sweep_dir, launch_dir, model_name)
        except TrainingStopped as e:
            if is_main:
                name = signal.Signals(e.signum).name
                print(f"{name} received: saved {e.checkpoint}; continue with: "
                      f"{continue_command(overrides, run_dir, launcher())}", file=sys.stderr, flush=True)
            sys.exit(128 + e.signum)
        except Exception as e:
            if getattr(e, "refused", False) and is_main:
                discard_launch(run_dir, launch_dir, created)
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            for kinds, code in EXIT_CODES:
                if isinstance(e, kinds):
                    print(f"error: {e}", file=sys.stderr, flush=True)
                    sys.exit(code)
            raise


def _checked(cfg: DictConfig) -> RunConfig:
    """The typed config; a value the schema rejects refuses the launch like any other bad input
    (without the mark, its record would stay in `.hydra/launches` of an existing run)."""
    try:
        return build_run_config(cfg)
    except Exception as e:
        e.refused = True
        raise


def run(run_cfg: RunConfig, run_dir: Path, overrides: list[str], sweep_dir: str | None = None,
        launch_dir: Path | None = None, model_name: str = "model") -> Any:
    """One run without Hydra's runtime (tests call this directly). An exception raised before
    training starts is marked `refused`: the launch then leaves the run directory as it was."""
    if run_cfg.mode == "plan":  # arithmetic only: no processes, devices or data
        from h64lm.modes import plan_layouts_for

        plan_layouts_for(run_cfg, model_name, overrides, run_dir)
        return None
    if run_cfg.mode == "pipeline":  # every stage runs in its own process: nothing to set up here
        from h64lm.modes import run_pipeline

        return run_pipeline(run_cfg, run_dir, overrides, launch_dir)
    try:
        if run_cfg.mode == "train":
            check_can_log(run_cfg.logger)
        d = init_distributed(run_cfg.hardware)
    except Exception as e:
        e.refused = True
        raise
    if run_cfg.mode == "train" and d.is_main and d.device.type == "cpu":
        import torch

        note = starvation_note(torch.get_num_threads())
        if note:
            print(note, flush=True)
    try:
        run_dir = Path(broadcast_object(str(run_dir), d))
        if run_cfg.mode == "train":
            return _train(run_cfg, run_dir, overrides, sweep_dir, launch_dir, d)
        if d.is_main:
            adopt_launch_record(run_dir, launch_dir)
        from h64lm import modes

        if run_cfg.mode == "eval":
            return modes.evaluate_checkpoint(run_cfg, run_dir, overrides, d)
        if run_cfg.mode == "export":
            return str(modes.export_checkpoint(run_cfg, run_dir, d))
        if run_cfg.mode == "chat":
            return modes.chat_with_checkpoint(run_cfg, run_dir, d)
        return modes.generate_from_checkpoint(run_cfg, run_dir, d)
    except RuntimeError as e:
        if d.enabled and is_peer_failure(e):
            raise PeerFailure(
                f"another process of this job failed ({str(e).strip().splitlines()[0][:120]}); "
                "rerun the job with train.resume=auto to continue from the last checkpoint") from e
        raise
    finally:
        d.shutdown()


def _train(run_cfg: RunConfig, run_dir: Path, overrides: list[str], sweep_dir: str | None,
           launch_dir: Path | None, d: Dist) -> float:
    from h64lm.train.loop import Trainer

    lock = RunDirLock(run_dir) if d.is_main else contextlib.nullcontext()
    try:
        if d.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            lock.acquire()
        trainer = Trainer(run_cfg, run_dir, overrides, d, sweep_dir)
    except Exception as e:
        e.refused = True
        if d.is_main:
            lock.release()
        raise
    try:
        if d.is_main:
            adopt_launch_record(run_dir, launch_dir)
        summary = trainer.fit()
        if d.is_main:
            (run_dir / "summary.json").write_text(json.dumps(summary, indent=1))
            print(final_summary_line(run_dir, summary, sweep_dir), flush=True)
        return summary["best_val_loss"]
    finally:
        if d.is_main:
            lock.release()
