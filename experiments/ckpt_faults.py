"""The checkpoint fault classes of issue 23 (1-3), registered by experiments/faults.py:

  6  disk full            ENOSPC inside DCP's shard writer from step 4 on (a disk that stays full):
                          exit 4, one line naming the path and the cause, step 2 intact, no process
                          left; a resume on the still-full disk exits 4 as fast; once freed, the
                          run continues to the reference's numbers.
  19 checkpoint damage    each damage to the newest checkpoint (a flipped byte inside a model shard,
                          a missing shard, garbage at a shard's start, damaged or truncated extras, a
                          manifest of the wrong shape) and each bad `last` pointer (not text, `../`,
                          an absolute path, a symlink out of the run): resume=auto falls back with
                          one line and matches the uninterrupted run.
  20 background saves     2 processes with train.async_save and a slow shard writer (FSDP; DDP +
                          expert parallelism): training steps run while the save is in flight, the
                          job finishes, and a resumed run matches the uninterrupted one.
  21 read-only            the checkpoints folder mounted read-only (root; bind mount): a save is
                          one line, exit 4, and the checkpoints already there still load.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

from experiments.fault_procs import TORCHRUN, differences, run_cli, run_losses, saved_step, start_run
from h64lm.cli import EXIT_BAD_INPUT, EXIT_CHECKPOINT
from h64lm.runtime.checkpoint import find_newest, verify

__all__ = ["checkpoint_faults", "fault_disk_full"]


def _errors(stderr: str) -> list[str]:
    return [x for x in stderr.splitlines() if x.startswith("error:")]


def _shard(step: Path) -> Path:
    return next(step.glob("__0_*.distcp"))


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


STEP_DAMAGE = {
    "flipped byte in a model shard": lambda d: _flip(_shard(d)),
    "missing shard": lambda d: _shard(d).unlink(),
    "garbage at a shard's start": lambda d: _shard(d).write_bytes(b"\xde\xad" * 8 + _shard(d).read_bytes()[16:]),
    "damaged extras": lambda d: _flip(d / "extras" / "rank_0.pt"),
    "truncated extras": lambda d: (d / "extras" / "rank_0.pt").write_bytes(b"PK\x03\x04"),
    "manifest of the wrong shape": lambda d: (d / "manifest.json").write_text(json.dumps({"files": [1, 2]})),
}
POINTER_DAMAGE = {
    "last not text": lambda c: (c / "last").write_bytes(b"\xff\xfe\x00\x01"),
    "last = ../": lambda c: (c / "last").write_text("../../reference/checkpoints/step_0000008\n"),
    "last = absolute path": lambda c: (c / "last").write_text(str(c.parent.parent / "reference") + "\n"),
    "last = symlink out": lambda c: ((c / "last").unlink(), (c / "last").symlink_to(c.parent.parent / "x")),
}


def fault_checkpoint_damage(lab, t) -> None:
    for name, damage in {**STEP_DAMAGE, **POINTER_DAMAGE}.items():
        with t.guard(name):
            run_dir = lab.fresh("damaged")
            shutil.copytree(lab.reference, run_dir, symlinks=True)
            ckpts = run_dir / "checkpoints"
            if name in POINTER_DAMAGE:  # the newest intact step is 6; the pointer leads elsewhere
                shutil.rmtree(ckpts / "step_0000008")
                shutil.rmtree(ckpts / "best")
                damage(ckpts)
            else:
                damage(ckpts / "step_0000008")
            log = lab.resume(run_dir)
            lines = [x for x in log.text.splitlines() if x.startswith("resume: ")]
            said = len(lines) == 1 and ("step_0000008" in lines[0] if name in STEP_DAMAGE else "last" in lines[0])
            diff = differences(run_dir, lab.reference)
            t.trial(said and log.step == 6, lost=bool(diff),
                    note=f"{name}: {'one line' if said else lines}, resumed at {log.step}" + (f" {diff[:2]}" if diff else ""))


def _alone(proc) -> bool:
    """No process of the job's session is left."""
    try:
        os.killpg(proc.pid, 0)
    except ProcessLookupError:
        return True
    return False


def fault_disk_full(lab, t) -> None:
    run_dir = lab.fresh("disk_full")
    full = {"H64LM_FAULT_ENOSPC_FROM": "4"}
    for attempt, extra in (("first run", []), ("resume on the still-full disk", ["train.resume=auto"])):
        proc = start_run(lab.base + extra + [f"hydra.run.dir={run_dir}"], lab.dir, env=full, log_name="disk_full")
        code = proc.wait(timeout=300)
        lines = _errors((lab.dir / "disk_full.err").read_text())
        named = (len(lines) == 1 and "the disk is full" in lines[0] and ".step_0000004.tmp" in lines[0])
        ckpts = run_dir / "checkpoints"
        intact = find_newest(ckpts, lambda s: None) == ckpts / "step_0000002"
        left = sorted(p.name for p in ckpts.glob(".*tmp*"))
        t.trial(code == EXIT_CHECKPOINT and named and not left and _alone(proc), lost=not intact,
                note=f"{attempt}: exit {code}, one line naming path and cause: {named}, step 2 intact: {intact}")
    log = lab.resume(run_dir)  # the disk was freed
    diff = differences(run_dir, lab.reference)
    t.trial(log.step == 2, lost=bool(diff), note=f"freed: resumed at {log.step}" + (f" {diff[:2]}" if diff else ""))


ASYNC = ["train.batch_size=1", "hardware.device=cpu", "hardware.precision=fp32", "hardware.timeout_s=60",
         "train.async_save=true", "train.save_every=2", "optim.schedule_steps=8"]
SLOW_WRITES = {"H64LM_FAULT_WRITE_DELAY": "1.5"}  # longer than a step: saves overlap training


def fault_background_saves(lab, t) -> None:
    for label, layout in (("fsdp", ["hardware=fsdp"]), ("ddp+ep2", ["hardware=ddp", "hardware.ep=2"])):
        with t.guard(label):
            full_dir, cut_dir = lab.fresh(f"async_{label}"), lab.fresh(f"async_{label}_resumed")
            args = lab.base + ASYNC + layout
            proc = start_run(args + [f"hydra.run.dir={full_dir}"], lab.dir, env=SLOW_WRITES,
                             launcher=TORCHRUN, log_name=f"async_{label}")
            code = proc.wait(timeout=400)
            ok = code == 0 and saved_step(full_dir) == 8 and _alone(proc)
            if ok:
                for step in full_dir.glob("checkpoints/step_*"):
                    verify(step)
            first = run_cli(args + ["train.max_steps=4", f"hydra.run.dir={cut_dir}"], lab.dir,
                            env=SLOW_WRITES, launcher=TORCHRUN, timeout=400)
            again = run_cli(args + ["train.resume=auto", f"hydra.run.dir={cut_dir}"], lab.dir,
                            env=SLOW_WRITES, launcher=TORCHRUN, timeout=400)
            mine, ref = run_losses(cut_dir), run_losses(full_dir)
            same = sorted(mine) == sorted(ref) and all(
                math.isclose(mine[s]["loss"], ref[s]["loss"], rel_tol=1e-6) for s in ref)
            t.trial(ok and first.returncode == 0 and again.returncode == 0, lost=not same,
                    note=f"{label}: async run exit {code}; 4 steps + resume=auto: exits {first.returncode}, "
                         f"{again.returncode}; losses equal: {same}")


def fault_read_only(lab, t) -> None:
    run_dir = lab.fresh("read_only")
    shutil.copytree(lab.reference, run_dir)
    ckpts = run_dir / "checkpoints"
    mounted = (subprocess.run(["mount", "--bind", str(ckpts), str(ckpts)], capture_output=True).returncode == 0
               and subprocess.run(["mount", "-o", "remount,bind,ro", str(ckpts)], capture_output=True).returncode == 0)
    if not mounted:
        t.notes.append("skipped: a read-only bind mount needs root")
        return
    try:
        proc = run_cli(lab.base + ["train.max_steps=10", "train.resume=auto", f"hydra.run.dir={run_dir}"], lab.dir)
        lines = _errors(proc.stderr)
        named = len(lines) == 1 and "read-only" in lines[0] and str(ckpts) in lines[0]
        intact = find_newest(ckpts, lambda s: None) == ckpts / "step_0000008"
        t.trial(proc.returncode == EXIT_CHECKPOINT and named, lost=not intact,
                note=f"checkpoints read-only: exit {proc.returncode}, one line: {named}")
    finally:
        subprocess.run(["umount", "-l", str(ckpts)], check=False)


def fault_read_only_folders(lab, t) -> None:
    """The run, sweep and cache folders on a read-only disk: one line naming the folder, exit 2,
    before Hydra or a cache builder writes (they raised OSError tracebacks before)."""
    mnt = lab.fresh("read_only_disk", make=True)
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1M", "tmpfs", str(mnt)],
                      capture_output=True).returncode != 0:
        t.notes.append("skipped: mounting a read-only tmpfs needs root")
        return
    try:
        cases = [("run folder", lab.base + [f"hydra.run.dir={mnt / 'run'}"], {}),
                 ("sweep folder", ["-m", *lab.base, f"hydra.sweep.dir={mnt / 'sweep'}"], {}),
                 ("cache folder", lab.base + [f"hydra.run.dir={lab.fresh('ro_cache_run')}"],
                  {"H64LM_CACHE_DIR": str(mnt / "cache")})]
        for name, args, env in cases:
            proc = run_cli(args, lab.dir, env=env)
            lines = _errors(proc.stderr)
            ok = (proc.returncode == EXIT_BAD_INPUT and len(lines) == 1 and str(mnt) in lines[0]
                  and "Traceback" not in proc.stderr)
            t.trial(ok, note=f"{name} read-only: exit {proc.returncode}, one line: {ok}")
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def checkpoint_faults(lab) -> list:
    return [("19 checkpoint damage", lambda t: fault_checkpoint_damage(lab, t)),
            ("20 background saves, 2 processes", lambda t: fault_background_saves(lab, t)),
            ("21 read-only checkpoints", lambda t: fault_read_only(lab, t)),
            ("23 read-only run/cache", lambda t: fault_read_only_folders(lab, t))]
