"""Inject every fault of issue 7 into short CPU training runs and count what survived.

    python experiments/faults.py [--trials 6] [--seed 0] [--workdir DIR]

Prints one line per fault, then `faults injected: N, survived: N, data lost: N`. A fault
*survived* when the run kept its promise (the documented exit code and one clear line, a recovery
that continues, a refusal); *data lost* counts recoveries whose losses or weights differ from the
uninterrupted reference run (bit for bit on CPU fp32; DDP up to rounding) and good checkpoints that
became unloadable. Takes several minutes on 2 cores. Exit status 0 only if all survived, none lost.
The fast cases also run in the test suite (tests/faults/).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "offline",
                   "WANDB_SILENT": "true", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import torch

from experiments import ckpt_faults as cf
from experiments import run_faults as rf
from experiments.data_faults import bad_rows_trials, damaged_cache_trials, killed_preparation_trial
from experiments.fault_cases import BAD_CONFIGS, bad_data_cases, write_bad_files
from experiments.fault_inject import poison_training_forward
from experiments.fault_procs import (
    FAST,
    TORCHRUN,
    ResumeLog,
    differences,
    kill_and_wait,
    logged_steps,
    rank_pids,
    run_cli,
    run_losses,
    saved_step,
    start_run,
    text_corpus,
    wait_until,
)
from experiments.hf_faults import hf_trials
from h64lm.cli import EXIT_BAD_INPUT, EXIT_CHECKPOINT, run
from h64lm.config import build_run_config
from h64lm.config import compose as compose_cfg
from h64lm.runtime.checkpoint import CheckpointError, read_extras, read_full_state, resolve, verify
from h64lm.runtime.control import TrainingDiverged

RUN = ["train.max_steps=8", "train.save_every=2", "train.eval_every=4", "train.keep_last=2"]
DDP = ["train.batch_size=1", "hardware=ddp", "hardware.device=cpu", "hardware.precision=fp32",
       "hardware.timeout_s=30"]
SLOW_STEPS = {"H64LM_FAULT_STEP_DELAY": "0.3"}


@dataclass
class Tally:
    name: str
    injected: int = 0
    survived: int = 0
    lost: int = 0
    notes: list[str] = field(default_factory=list)

    def trial(self, ok: bool, note: str = "", lost: bool = False) -> None:
        self.injected += 1
        self.survived += int(ok and not lost)
        self.lost += int(lost)
        if note:
            self.notes.append(note if ok and not lost else f"FAILED {note}")

    @contextlib.contextmanager
    def guard(self, label: str):
        """One trial whose harness may itself fail: that counts as not survived, and goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001
            self.trial(False, note=f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:100]}")

    def line(self) -> str:
        status = "ok  " if self.survived == self.injected and not self.lost else "FAIL"
        return (f"{status} {self.name:<24} {self.survived}/{self.injected} survived, "
                f"{self.lost} lost; {'; '.join(self.notes)}")


class Lab:
    """The work folder, the corpus, the reference run and quiet in-process runs."""

    def __init__(self, workdir: Path, seed: int):
        self.dir, self.rng = workdir, random.Random(seed)
        self.corpus = text_corpus(workdir)
        self.base = FAST + ["data=text", f"data.path={self.corpus}"] + RUN
        self.reference = self.fresh("reference")
        self.run(self.base, self.reference)

    def fresh(self, name: str, make: bool = False) -> Path:
        """`name` under the work folder, emptied: absent (a run's new directory) or, with `make`, empty."""
        path = self.dir / name
        shutil.rmtree(path, ignore_errors=True)
        if make:
            path.mkdir(parents=True)
        return path

    def run(self, args: list[str], run_dir: Path) -> str:
        """An in-process run; its printed output (the trainer's log) is returned, not shown."""
        out = io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
            try:
                run(build_run_config(compose_cfg(args)), run_dir, args)
            finally:
                (self.dir / "last_inprocess.log").write_text(out.getvalue())
        return out.getvalue()

    def resume(self, run_dir: Path, extra: list[str] = ()) -> ResumeLog:
        return ResumeLog(self.run(self.base + list(extra) + ["train.resume=auto"], run_dir))


def fault_sigkill(lab: Lab, t: Tally, trials: int) -> None:
    """SIGKILL at random moments (a checkpoint every step, so many land in a write); one trial
    deliberately inside a half-written checkpoint."""
    for i in range(trials):
        with t.guard(f"trial {i}"):
            _sigkill_trial(lab, t, i)


def _sigkill_trial(lab: Lab, t: Tally, i: int) -> None:
    run_dir, env = lab.fresh(f"sigkill{i}"), dict(SLOW_STEPS)
    args = lab.base + ["train.save_every=1", f"hydra.run.dir={run_dir}"]
    if i == 0:
        marker = run_dir.parent / "sigkill_inside_save"
        marker.unlink(missing_ok=True)
        env.update(H64LM_FAULT_SAVE_MARKER=str(marker), H64LM_FAULT_SAVE_AFTER="4")
    proc = start_run(args, lab.dir, env=env, log_name=f"sigkill{i}")
    if i == 0:
        wait_until(marker.exists, proc, 300, "the checkpoint write")
        moment = "inside the step-5 write"
    else:
        step = lab.rng.randint(1, 6)
        wait_until(lambda: logged_steps(run_dir) >= step, proc, 300, f"step {step}")
        time.sleep(lab.rng.uniform(0, 0.5))
        moment = f"after step {logged_steps(run_dir)}"
    kill_and_wait(proc, signal.SIGKILL, 30)
    partial = len(list((run_dir / "checkpoints").glob(".*.tmp")))
    log = lab.resume(run_dir, ["train.save_every=1"])
    diff = differences(run_dir, lab.reference)
    t.trial(True, lost=bool(diff),
            note=f"{moment} -> resumed at {log.step}" + (f" ({partial} partial save)" if partial else "")
            + (f" {diff[:2]}" if diff else ""))


def fault_stop_signals(lab: Lab, t: Tally) -> None:
    for sig in (signal.SIGTERM, signal.SIGINT):
        name, run_dir = signal.Signals(sig).name, lab.fresh(f"stop_{sig}")
        proc = start_run(lab.base + [f"hydra.run.dir={run_dir}"], lab.dir, env=SLOW_STEPS,
                         log_name=f"stop_{sig}")
        wait_until(lambda d=run_dir: logged_steps(d) >= 3, proc, 300, "step 3")
        code, seconds = kill_and_wait(proc, sig, 60)
        line = (lab.dir / f"stop_{sig}.err").read_text().strip().splitlines()[-1]
        saved = saved_step(run_dir)
        log = lab.resume(run_dir)
        diff = differences(run_dir, lab.reference)
        ok = code == 128 + sig and line.startswith(f"{name} received: saved") and log.step == saved
        t.trial(ok, lost=bool(diff), note=f"{name}: exit {code} after {seconds:.1f} s, saved step "
                f"{saved}, resumed at {log.step}" + (f" {diff[:2]}" if diff else ""))


def _damage(path: Path, kind: str) -> None:
    data = bytearray(path.read_bytes())
    if kind == "bit flip":
        data[len(data) // 2] ^= 0x10
    else:
        data = data[: len(data) // 3]
    with open(path, "r+b") as f:  # in place: best/ may hold the same file (a hard link)
        f.truncate(0)
        f.write(data)


def fault_corrupt(lab: Lab, t: Tally) -> None:
    for kind in ("bit flip", "truncation"):
        run_dir = lab.fresh(f"corrupt_{kind.replace(' ', '_')}")
        shutil.copytree(lab.reference, run_dir)
        newest = run_dir / "checkpoints" / "step_0000008"
        shard = next(newest.glob("__0_*.distcp"))
        _damage(shard, kind)  # a model shard: only the manifest of every file catches it
        try:
            verify(newest)
            named = False
        except CheckpointError as e:
            named = str(newest) in str(e) and shard.name in str(e)
        log = lab.resume(run_dir)
        diff = differences(run_dir, lab.reference)
        said = len(log.skipped) == 1 and newest.name in log.skipped[0]
        t.trial(named and said and log.step == 6, lost=bool(diff),
                note=f"{kind}: refused naming the file, fell back to step {log.step}")


def fault_malicious_pickle(lab: Lab, t: Tally) -> None:
    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {lab.dir / 'PWNED'}",))

    import pickle

    from h64lm.runtime.checkpoint.manifest import file_digest, read_manifest, write_manifest

    for target in (".metadata", "extras/rank_0.pt"):  # DCP's pickled index; the plain data
        run_dir = lab.fresh("malicious")
        step = run_dir / "checkpoints" / "step_0000006"
        shutil.copytree(lab.reference / "checkpoints" / "step_0000006", step)
        if target == ".metadata":
            (step / target).write_bytes(pickle.dumps(Evil()))
        else:
            torch.save({"step": 6, "payload": Evil()}, step / target)
        body = read_manifest(step)  # the attacker hands over a manifest that matches
        write_manifest(step, {**body["files"], target: file_digest(step / target)}, {"step": 6})
        proc = run_cli(lab.base + ["train.resume=auto", f"hydra.run.dir={run_dir}"], lab.dir)
        lines = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
        ok = (proc.returncode == EXIT_CHECKPOINT and len(lines) == 1 and "refused" in lines[0]
              and not (lab.dir / "PWNED").exists())
        t.trial(ok, note=f"{target}: manifest valid, still refused (exit {proc.returncode}); payload never ran")


def fault_nonfinite(lab: Lab, t: Tally) -> None:
    run_dir = lab.fresh("nan_isolated")
    undo = poison_training_forward(loss_steps={3}, grad_steps={6})
    try:
        lab.run(lab.base, run_dir)
    finally:
        undo()
    skipped = read_extras(resolve(run_dir))["skipped_steps"]
    t.trial(skipped == 2, note=f"NaN loss + NaN grads: {skipped} steps skipped, run finished")

    run_dir = lab.fresh("nan_streak")
    undo = poison_training_forward(loss_steps=set(range(3, 100)))
    try:
        lab.run(lab.base + ["train.save_every=1", "train.keep_last=8", "train.max_bad_steps=3"],
                run_dir)
        stopped = ""
    except TrainingDiverged as e:
        stopped = str(e)
    finally:
        undo()
    good = read_full_state(run_dir / "checkpoints" / "step_0000002")["model"]
    last = read_full_state(run_dir / "checkpoints" / "step_0000005")["model"]
    same = all(torch.equal(good[k], last[k]) for k in good)
    t.trial("optim.lr" in stopped and "bf16" in stopped, lost=not same,
            note="3 NaN steps in a row: stopped, last good weights saved")

    run_dir = lab.fresh("fp16_overflow")
    undo = poison_training_forward(grad_steps=set(range(2, 8)), value=float("inf"))
    try:
        lab.run(lab.base + ["hardware.precision=fp16", "train.max_bad_steps=3"], run_dir)
    finally:
        undo()
    state = read_extras(resolve(run_dir))
    t.trial(state["step"] == 8 and state["scaler"]["scale"] == 2.0**10,
            note=f"fp16: 6 overflows in a row, scale 65536 -> {state['scaler']['scale']:.0f}, no stop")


def fault_bad_config(lab: Lab, t: Tally) -> None:
    from hydra.errors import ConfigCompositionException

    for overrides, key in BAD_CONFIGS:
        try:
            build_run_config(compose_cfg(overrides)).train.micro_batches_per_step(1)
            message = "accepted"
        except ConfigCompositionException as e:
            message = str(e.__cause__ or e)
        except ValueError as e:
            message = str(e) if "\n" not in str(e) else ""
        t.trial(key in message, note="" if key in message else f"{overrides}: {message[:80]}")
    cache = lab.dir / "untouched_cache"
    cli_cases = [
        (["model.num_experts_per_token=9"], None, "error: model.num_experts_per_token=9 must be <="),
        (["data=text"], None, "error: data=text needs data.path="),
        (["train.global_batch_size=3"] + DDP, TORCHRUN[:-1],  # every rank says it, then exits
         "error: train.global_batch_size=3 is not a multiple of train.batch_size=1 x 2 process(es)"),
    ]
    for overrides, launcher, expected in cli_cases:
        proc = run_cli(FAST + overrides + [f"hydra.run.dir={lab.dir / 'bad'}"], lab.dir,
                       env={"H64LM_CACHE_DIR": str(cache)}, launcher=launcher)
        ours = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
        lines = [x for x in proc.stderr.splitlines() if x.strip()]
        ok = (bool(ours) and all(x.startswith(expected) for x in ours) and not cache.exists()
              and (launcher is not None or (lines == ours and proc.returncode == EXIT_BAD_INPUT)))
        t.trial(ok, note="" if ok else f"CLI {overrides[0]}: exit {proc.returncode} {proc.stderr[-200:]!r}")
    t.notes.insert(0, f"{len(BAD_CONFIGS)} in-process + 3 CLI (one line, before any data or model)")


def fault_bad_data(lab: Lab, t: Tally) -> None:
    from h64lm.train import loop

    folder = lab.fresh("bad_data")
    write_bad_files(folder)
    real_build = loop.build_model  # every layout builds its model through it

    def refuse(*args, **kwargs):
        raise AssertionError("the model was built although the data was bad")

    loop.build_model = refuse
    try:
        for case in bad_data_cases(folder, lab.corpus):
            args = FAST + ["data=text"] + case.overrides
            try:
                lab.run(args, folder / "run")
                message = "no error"
            except Exception as e:  # noqa: BLE001 (any other kind is the failure we count)
                message = str(e) if isinstance(e, (ValueError, FileNotFoundError)) else repr(e)
            ok = "\n" not in message and message.startswith(case.message_start)
            t.trial(ok, note=f"{case.name}: " + ("one line" if ok else repr(message[:70])))
    finally:
        loop.build_model = real_build


def fault_ddp_kill(lab: Lab, t: Tally) -> None:
    for victim in (1, 0):
        run_dir = lab.fresh(f"ddp_kill{victim}")
        args = lab.base + DDP + [f"hydra.run.dir={run_dir}"]
        proc = start_run(args, lab.dir, env=SLOW_STEPS, launcher=TORCHRUN, log_name=f"ddp{victim}")
        wait_until(lambda d=run_dir: logged_steps(d) >= 3, proc, 300, "step 3")
        pids = rank_pids(proc.pid)
        start = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        try:
            code = proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            t.trial(False, note=f"rank {victim} killed: the job hung")
            continue
        seconds = time.monotonic() - start
        again = run_cli(args + ["train.resume=auto"], lab.dir, launcher=TORCHRUN)
        mine, ref = run_losses(run_dir), run_losses(lab.reference)
        same = sorted(mine) == sorted(ref) and all(
            math.isclose(mine[s]["loss"], ref[s]["loss"], rel_tol=1e-4) for s in ref)
        resumed = [x for x in again.stdout.splitlines() if x.startswith("resuming from")]
        t.trial(code != 0 and again.returncode == 0, lost=not same,
                note=f"rank {victim} killed: job ended in {seconds:.1f} s, "
                     f"{resumed[0].split('/')[-1] if resumed else 'NOT resumed'} under torchrun")


def fault_cache_race(lab: Lab, t: Tally, jobs: int = 3) -> None:
    cache = lab.fresh("race_cache")
    procs = [start_run(lab.base + ["train.max_steps=1", f"hydra.run.dir={lab.fresh(f'race{i}')}"],
                       lab.dir, env={"H64LM_CACHE_DIR": str(cache)}, log_name=f"race{i}")
             for i in range(jobs)]
    codes = [p.wait(timeout=600) for p in procs]
    corpora = [f for f in (cache / "corpus").iterdir() if f.is_dir()]
    first = run_losses(lab.reference)[1]
    same = all(run_losses(lab.dir / f"race{i}").get(1) == first for i in range(jobs))
    t.trial(codes == [0] * jobs and len(corpora) == 1, lost=not same,
            note=f"{jobs} jobs at once on a fresh cache: exits {codes}, {len(corpora)} cache folder, "
                 f"identical first-step losses")


def fault_killed_tokenization(lab: Lab, t: Tally) -> None:
    for sig in (signal.SIGKILL, signal.SIGTERM):
        with t.guard(signal.Signals(sig).name):
            t.trial(*killed_preparation_trial(lab.fresh(f"killed_tokenize_{sig}", make=True), sig))


def _count(t: Tally, label: str, trial: Callable[[], rf.Outcome | list[rf.Outcome]]) -> None:
    """Tally what a run-directory trial (experiments/run_faults.py) returns."""
    with t.guard(label):
        result = trial()
        for outcome in result if isinstance(result, list) else [result]:
            t.trial(outcome.ok, note=outcome.note, lost=outcome.lost)


def fault_run_owner(lab: Lab, t: Tally) -> None:
    _count(t, "two at once", lambda: rf.two_launches_at_once(lab.dir, lab.base, lab.reference))
    _count(t, "stale lock", lambda: rf.stale_lock_taken_over(lab.dir, lab.base, lab.reference))


def fault_resume_rules(lab: Lab, t: Tally) -> None:
    for label, trial in [("best/ only", rf.resume_from_best), ("all corrupt", rf.all_corrupt_refused),
                         ("torn metrics", rf.torn_metrics_line)]:
        _count(t, label, lambda trial=trial: trial(lab.dir, lab.base, lab.reference))


def fault_unworkable_values(lab: Lab, t: Tally) -> None:
    _count(t, "bad values", lambda: rf.bad_value_launches(lab.fresh("bad_values")))
    _count(t, "all NaN", lambda: rf.every_step_nonfinite(lab.dir, lab.base))
    _count(t, "finished", lambda: rf.finished_resume_refused(lab.dir, lab.base, lab.reference))


def fault_provenance(lab: Lab, t: Tally) -> None:
    """On the directory `fault_run_owner`'s two launches trained (a `python run.py` run)."""
    _count(t, "provenance", lambda: rf.provenance_trials(lab.dir / "one_owner", lab.base))


def _tally_all(t: Tally, results: list[tuple[bool, str]], what: str) -> None:
    for ok, note in results:
        t.trial(ok, note="" if ok else note)
    t.notes.insert(0, f"{len(results)} {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=6, help="SIGKILL trials (>= 5)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the kill moments")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--only", nargs="+", default=None, metavar="N",
                        help="run only these fault classes (their numbers, e.g. --only 3 4 6 19)")
    opts = parser.parse_args()
    workdir = opts.workdir or Path(tempfile.mkdtemp(prefix="h64lm-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("H64LM_CACHE_DIR", str(workdir / "cache"))
    started = time.monotonic()
    lab = Lab(workdir.resolve(), opts.seed)
    faults = [
        ("1 SIGKILL + resume", lambda t: fault_sigkill(lab, t, opts.trials)),
        ("2 SIGTERM/SIGINT", lambda t: fault_stop_signals(lab, t)),
        ("3 corrupt checkpoint", lambda t: fault_corrupt(lab, t)),
        ("4 malicious pickle", lambda t: fault_malicious_pickle(lab, t)),
        ("5 NaN/Inf, fp16", lambda t: fault_nonfinite(lab, t)),
        ("6 disk full (ENOSPC)", lambda t: cf.fault_disk_full(lab, t)),
        ("7 bad configuration", lambda t: fault_bad_config(lab, t)),
        ("8 bad data", lambda t: fault_bad_data(lab, t)),
        ("9 DDP rank killed", lambda t: fault_ddp_kill(lab, t)),
        ("10 cache race", lambda t: fault_cache_race(lab, t)),
        ("11 killed tokenization", lambda t: fault_killed_tokenization(lab, t)),
        ("12 damaged cache", lambda t: _tally_all(
            t, damaged_cache_trials(lab.fresh("damaged_cache", make=True)), "damages rebuilt in one line")),
        ("13 bad rows / paths", lambda t: _tally_all(
            t, bad_rows_trials(lab.fresh("bad_rows", make=True)), "cases: one line or a count")),
        ("14 one owner per run dir", lambda t: fault_run_owner(lab, t)),
        ("15 resume=auto rules", lambda t: fault_resume_rules(lab, t)),
        ("16 unworkable values", lambda t: fault_unworkable_values(lab, t)),
        ("17 stop during eval", lambda t: _count(
            t, "stop in eval", lambda: rf.stop_during_evaluation(lab.dir, lab.base, lab.reference))),
        ("18 provenance", lambda t: fault_provenance(lab, t)),
        *cf.checkpoint_faults(lab),
        ("22 HF round trip", lambda t: _count(t, "hf", lambda: hf_trials(lab.fresh("hf"), lab.base, lab.reference))),
    ]
    tallies = []
    for name, inject in faults:
        if opts.only and name.split()[0] not in opts.only:
            continue
        tally = Tally(name)
        try:
            inject(tally)
        except Exception as e:  # noqa: BLE001 (a fault the harness did not expect still counts)
            tally.trial(False, note=f"{type(e).__name__}: {str(e).splitlines()[0][:120]}")
            with open(workdir / f"error_{name.split()[0]}.txt", "w") as f:
                traceback.print_exc(file=f)
        tallies.append(tally)
        print(tally.line(), flush=True)
    injected = sum(t.injected for t in tallies)
    survived = sum(t.survived for t in tallies)
    lost = sum(t.lost for t in tallies)
    print(f"faults injected: {injected}, survived: {survived}, data lost: {lost}  "
          f"({time.monotonic() - started:.0f} s; work folder {workdir})")
    return 0 if survived == injected and lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
