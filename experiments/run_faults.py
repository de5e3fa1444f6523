"""Faults on a run directory, shared by experiments/faults.py and tests/faults/test_run_dir.py.

  owner       two launches of one `hydra.run.dir` at once; a lock left by a SIGKILLed run
  resume      resume=auto with every checkpoint but best/ corrupt, with all corrupt, and with
              a metrics line torn by a crash
  unworkable  values that pass a type check but cannot train (lr=nan, -1 sizes, online W&B
              without a key, a missing or finished resume, a run whose every step is NaN)
  quick stop  SIGTERM while a long evaluation runs
  provenance  resumes keep the first launch's config; refused launches change nothing

Every trial returns `Outcome`s: `ok` when the run kept its promise, `lost` when a recovered run
differs from the uninterrupted `reference` run (see fault_procs.differences).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from experiments.fault_inject import poison_training_forward
from experiments.fault_procs import (
    FAST,
    ResumeLog,
    differences,
    kill_and_wait,
    logged_steps,
    run_cli,
    run_losses,
    saved_step,
    start_run,
    wait_until,
)

__all__ = ["Outcome", "all_corrupt_refused", "bad_value_launches", "every_step_nonfinite",
           "finished_resume_refused", "provenance_trials", "quiet_run", "resume_from_best",
           "snapshot", "stale_lock_taken_over", "stop_during_evaluation", "torn_metrics_line",
           "two_launches_at_once"]

SLOW_STEPS = {"H64LM_FAULT_STEP_DELAY": "0.3"}


@dataclass
class Outcome:
    ok: bool
    note: str
    lost: bool = False


def quiet_run(args: list[str], run_dir: Path) -> str:
    """An in-process training run; returns what it printed."""
    from h64lm.cli import run
    from h64lm.config import build_run_config, compose

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        run(build_run_config(compose(args)), run_dir, args)
    return out.getvalue()


def snapshot(run_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of every file but the lock (its text names the latest holder)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(run_dir).rglob("*")) if p.is_file() and p.name != ".lock"}


def _changed(before: dict[str, str], after: dict[str, str]) -> list[str]:
    """Files added, removed or rewritten, run.log aside (every launch appends its console there)."""
    return sorted(k for k in set(before) | set(after) if k != "run.log" and before.get(k) != after.get(k))


def _error_lines(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.strip()]


def _metrics_lines_ok(run_dir: Path) -> tuple[bool, list[int]]:
    """(every line is a whole JSON record, the logged steps in file order)."""
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    try:
        steps = [json.loads(line)["step"] for line in lines]
    except (json.JSONDecodeError, KeyError):
        return False, []
    return True, steps


def _corrupt(checkpoint: Path) -> None:
    """Cut a checkpoint's shard short; unlink first, as `best/` may hold hard links to a step's files."""
    path = next(checkpoint.glob("__0_*.distcp"))
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[: len(data) // 3])


# ----------------------------------------------------------------------------- one owner per run dir
def two_launches_at_once(folder: Path, base: list[str], reference: Path) -> Outcome:
    """`run.py ... train.resume=auto hydra.run.dir=SAME` twice at once: one trains, one exits 2."""
    run_dir = folder / "one_owner"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = base + ["train.resume=auto", f"hydra.run.dir={run_dir}"]
    procs = [start_run(args, folder, env=SLOW_STEPS, log_name=f"owner{i}") for i in range(2)]
    codes = [p.wait(timeout=600) for p in procs]
    if sorted(codes) != [0, 2]:
        return Outcome(False, f"two launches: exits {codes}")
    winner, loser = (procs[0], procs[1]) if codes[0] == 0 else (procs[1], procs[0])
    lines = _error_lines((folder / f"owner{procs.index(loser)}.err").read_text())
    named = (len(lines) == 1 and lines[0].startswith(f"error: another run is training in {run_dir}")
             and f'"pid": {winner.pid}' in lines[0])
    whole, steps = _metrics_lines_ok(run_dir)
    launches = len(list((run_dir / ".hydra" / "launches").iterdir()))
    diff = differences(run_dir, reference)
    ok = named and whole and steps == list(range(1, 9)) and launches == 1
    return Outcome(ok, f"two at once: exits {codes}, loser's line names pid {winner.pid}: {named}, "
                   f"metrics steps {steps[:1]}..{steps[-1:]} once each, {launches} launch record"
                   + (f" {diff[:2]}" if diff else ""), lost=bool(diff))


def stale_lock_taken_over(folder: Path, base: list[str], reference: Path) -> Outcome:
    """A run SIGKILLed mid-training leaves `.lock` naming it; the next launch takes over."""
    run_dir = folder / "stale_lock"
    shutil.rmtree(run_dir, ignore_errors=True)
    proc = start_run(base + [f"hydra.run.dir={run_dir}"], folder, env=SLOW_STEPS, log_name="stale_lock")
    wait_until(lambda: logged_steps(run_dir) >= 3, proc, 300, "step 3")
    kill_and_wait(proc, signal.SIGKILL, 30)
    left = json.loads((run_dir / ".lock").read_text())["pid"] == proc.pid
    log = ResumeLog(quiet_run(base + ["train.resume=auto"], run_dir))
    diff = differences(run_dir, reference)
    return Outcome(left and log.step == 2, f"SIGKILL after step 3, lock of pid {proc.pid} left: {left}; "
                   f"taken over, resumed at {log.step}" + (f" {diff[:2]}" if diff else ""), lost=bool(diff))


# ----------------------------------------------------------------------------- resume=auto
def resume_from_best(folder: Path, base: list[str], reference: Path) -> Outcome:
    """Every step checkpoint corrupt, best/ whole: resume=auto continues from best/."""
    from h64lm.runtime.checkpoint import read_extras

    run_dir = folder / "best_only"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference, run_dir)
    ckpts = run_dir / "checkpoints"
    best_step = read_extras(ckpts / "best")["step"]
    for path in ckpts.glob("step_*"):
        _corrupt(path)
    log = ResumeLog(quiet_run(base + ["train.max_steps=10", "train.resume=auto"], run_dir))
    whole, steps = _metrics_lines_ok(run_dir)
    chose_best = f"checkpoints/best (step {best_step})" in log.text
    mine, ref = run_losses(run_dir), run_losses(reference)
    kept = all(mine.get(s) == ref[s] for s in ref if s <= best_step)
    ok = chose_best and len(log.skipped) == 2 and whole and steps == list(range(1, 11))
    return Outcome(ok, f"step directories corrupt: {len(log.skipped)} skipped, resumed from best/ "
                   f"(step {best_step}): {chose_best}, steps 1..10 once each: {steps == list(range(1, 11))}",
                   lost=not kept)


def all_corrupt_refused(folder: Path, base: list[str], reference: Path) -> Outcome:
    """Every checkpoint corrupt: `python run.py` refuses (exit 4) naming what it found, and the
    directory, best/, best_model.safetensors and metrics.jsonl included, stays byte-identical."""
    run_dir = folder / "all_corrupt"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference, run_dir)
    for path in [*(run_dir / "checkpoints").glob("step_*"), run_dir / "checkpoints" / "best"]:
        _corrupt(path)
    before = snapshot(run_dir)
    proc = run_cli(base + ["train.resume=auto", f"hydra.run.dir={run_dir}"], folder)
    lines = _error_lines(proc.stderr)
    said = (len(lines) == 1 and "refusing to restart it from step 0" in lines[0]
            and "checkpoints/best" in lines[0])
    changed = _changed(before, snapshot(run_dir))
    return Outcome(proc.returncode == 4 and said and not changed,
                   f"all corrupt: exit {proc.returncode}, one line naming best/: {said}, "
                   f"changed: {changed or 'nothing'}")


def torn_metrics_line(folder: Path, base: list[str], reference: Path) -> Outcome:
    """A run dies after step 5 in the middle of writing a metrics line; resume=auto drops the torn
    line (and step 5, past the step-4 checkpoint) and logs steps 5..8 once."""
    from h64lm.train.loop import Trainer

    class Killed(Exception):
        pass

    run_dir = folder / "torn_metrics"
    shutil.rmtree(run_dir, ignore_errors=True)
    step = Trainer.train_step

    def dying_step(self, stop_requested):
        if self.step == 5:
            with open(self.run_dir / "metrics.jsonl", "a") as f:
                f.write('{"step": 6, "loss": 3.1')
            raise Killed
        return step(self, stop_requested)

    Trainer.train_step = dying_step
    try:
        quiet_run(base, run_dir)
    except Killed:
        pass
    finally:
        Trainer.train_step = step
    torn = (run_dir / "metrics.jsonl").read_text().endswith('"loss": 3.1')
    log = ResumeLog(quiet_run(base + ["train.resume=auto"], run_dir))
    whole, steps = _metrics_lines_ok(run_dir)
    diff = differences(run_dir, reference)
    return Outcome(torn and whole and steps == list(range(1, 9)) and log.step == 4,
                   f"torn line after step 5: resumed at {log.step}, every line whole: {whole}, steps "
                   f"1..8 once each: {steps == list(range(1, 9))}" + (f" {diff[:2]}" if diff else ""),
                   lost=bool(diff))


# ----------------------------------------------------------------------------- values that cannot work
def bad_value_launches(folder: Path) -> list[Outcome]:
    """`python run.py` with values that cannot train: exit 2, one line naming the option, before
    the tokenizer or the model (no cache folder) and without leaving the run directory behind."""
    cases: list[tuple[list[str], str, dict[str, str]]] = [
        (["optim.lr=inf"], "error: optim.lr=inf must be a finite number", {}),
        (["optim.lr=nan"], "error: optim.lr=nan must be a finite number", {}),
        (["train.val_batch_size=-1"], "error: train.val_batch_size=-1 must be >= 1", {}),
        (["hardware.num_threads=-1"], "error: hardware.num_threads=-1 must be >= 1", {}),
        (["train.resume=/missing.pt"], "error: train.resume=/missing.pt:", {}),
        (["logger=wandb", "logger.mode=online"], "error: logger.mode=online needs W&B credentials",
         {"WANDB_API_KEY": "", "NETRC": str(folder / "no_netrc")}),
    ]
    folder.mkdir(parents=True, exist_ok=True)
    outcomes = []
    for overrides, start, env in cases:
        cache, run_dir = folder / "bad_value_cache", folder / "bad_value_run"
        shutil.rmtree(run_dir, ignore_errors=True)
        proc = run_cli(FAST + overrides + [f"hydra.run.dir={run_dir}"], folder,
                       env={**env, "H64LM_CACHE_DIR": str(cache)})
        lines = _error_lines(proc.stderr)
        ok = (proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(start)
              and not cache.exists() and not run_dir.exists())
        outcomes.append(Outcome(ok, f"{' '.join(overrides)}: exit {proc.returncode}, "
                                f"{'one line' if len(lines) == 1 else f'{len(lines)} lines'}"
                                + ("" if ok else f" {proc.stderr[-300:]!r} cache made: {cache.exists()}, "
                                   f"dir left: {run_dir.exists()}")))
    return outcomes


def finished_resume_refused(folder: Path, base: list[str], reference: Path) -> Outcome:
    """resume=auto of a run already at train.max_steps: exit 2 saying so, nothing changed."""
    run_dir = folder / "finished"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.copytree(reference, run_dir)
    before = snapshot(run_dir)
    proc = run_cli(base + ["train.resume=auto", f"hydra.run.dir={run_dir}"], folder)
    lines = _error_lines(proc.stderr)
    said = len(lines) == 1 and "already at step 8 >= train.max_steps=8" in lines[0]
    changed = _changed(before, snapshot(run_dir))
    return Outcome(proc.returncode == 2 and said and not changed,
                   f"resume at max_steps: exit {proc.returncode}, says so: {said}, changed: {changed or 'nothing'}")


def every_step_nonfinite(folder: Path, base: list[str]) -> Outcome:
    """Every step NaN, but fewer steps than train.max_bad_steps: the run ends diverged (exit 3),
    never "finished"."""
    from h64lm import cli
    from h64lm.config import compose

    run_dir = folder / "all_nan"
    shutil.rmtree(run_dir, ignore_errors=True)
    args = base + ["train.max_bad_steps=20"]
    info = cli._hydra_run_info
    cli._hydra_run_info = lambda: (run_dir, args, None, None)
    undo = poison_training_forward(loss_steps=set(range(1, 100)))
    err, code = io.StringIO(), None
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
            cli.main(compose(args))
    except SystemExit as e:
        code = e.code
    finally:
        undo()
        cli._hydra_run_info = info
    lines = _error_lines(err.getvalue())
    said = bool(lines) and lines[-1].startswith("error: no step of this run had a finite loss")
    state = json.loads((run_dir / "status.json").read_text())["state"]
    ok = code == 3 and said and state == "diverged" and not (run_dir / "summary.json").exists()
    return Outcome(ok, f"8 NaN steps < max_bad_steps=20: exit {code}, status {state}")


# ----------------------------------------------------------------------------- stopping is quick
def stop_during_evaluation(folder: Path, base: list[str], reference: Path,
                           batch_delay: float = 0.5, limit_s: float = 5.0) -> Outcome:
    """SIGTERM as a long evaluation starts (batch 1, every validation window, `batch_delay` s per
    batch): a checkpoint and exit 143 within `limit_s` seconds, not after the evaluation."""
    run_dir = folder / "stop_in_eval"
    shutil.rmtree(run_dir, ignore_errors=True)
    marker = folder / "eval_started"
    marker.unlink(missing_ok=True)
    long_eval = ["data.val_windows=null", "train.val_batch_size=1"]
    env = {"H64LM_FAULT_EVAL_DELAY": str(batch_delay), "H64LM_FAULT_EVAL_MARKER": str(marker)}
    proc = start_run(base + long_eval + [f"hydra.run.dir={run_dir}"], folder, env=env, log_name="stop_in_eval")
    wait_until(marker.exists, proc, 300, "the first evaluation")
    windows = int(marker.read_text().split()[1])
    code, seconds = kill_and_wait(proc, signal.SIGTERM, 120)
    last = _error_lines((folder / "stop_in_eval.err").read_text())[-1]
    saved = saved_step(run_dir)
    log = ResumeLog(quiet_run(base + long_eval + ["train.resume=auto"], run_dir))
    diff = differences(run_dir, reference)
    ok = (code == 143 and seconds < limit_s and last.startswith("SIGTERM received: saved")
          and saved == 4 and log.step == 4)
    return Outcome(ok, f"SIGTERM in a {windows * batch_delay:.0f} s evaluation: exit {code} after {seconds:.1f} s, "
                   f"saved step {saved}, resumed at {log.step}" + (f" {diff[:2]}" if diff else ""),
                   lost=bool(diff))


# ----------------------------------------------------------------------------- provenance
def provenance_trials(run_dir: Path, base: list[str]) -> list[Outcome]:
    """On a run made by `python run.py` (8 steps of `base`): refused launches (a model mismatch, a
    value the schema rejects) leave it byte-identical but run.log; a resume keeps the first
    launch's `.hydra/{config,overrides,hydra}.yaml`."""
    record = {name: (run_dir / ".hydra" / name).read_bytes() for name in ("config.yaml", "overrides.yaml")}
    launches = len(list((run_dir / ".hydra" / "launches").iterdir()))
    outcomes = []
    refusals: list[tuple[str, list[str], Callable[[str], bool]]] = [
        ("model mismatch", ["model.num_experts=2"], lambda e: "model.num_experts (4 -> 2)" in e),
        ("rejected value", ["optim.lr=nan"], lambda e: "optim.lr=nan" in e),
    ]
    for name, extra, says in refusals:
        before = snapshot(run_dir)
        proc = run_cli(base + ["train.max_steps=10", "train.resume=auto", f"hydra.run.dir={run_dir}"] + extra,
                       run_dir.parent)
        changed = _changed(before, snapshot(run_dir))
        outcomes.append(Outcome(proc.returncode == 2 and says(proc.stderr) and not changed,
                                f"refused {name}: exit {proc.returncode}, changed: {changed or 'nothing'}"))
    proc = run_cli(base + ["train.max_steps=10", "train.resume=auto", f"hydra.run.dir={run_dir}"], run_dir.parent)
    kept = [name for name, text in record.items() if (run_dir / ".hydra" / name).read_bytes() == text]
    added = len(list((run_dir / ".hydra" / "launches").iterdir())) - launches
    outcomes.append(Outcome(proc.returncode == 0 and len(kept) == 2 and added == 1,
                            f"resume: exit {proc.returncode}, first launch's {' + '.join(kept)} kept, "
                            f"{added} launch record added"))
    return outcomes
