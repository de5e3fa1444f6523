"""`mode=pipeline`: the stages of `pipeline.stages` in order, each as its own `python run.py`
process in RUN/stages/<k>_<name>/, each but the first initialised from the one before
(`train.init_from=<its run directory>`: the newest checkpoint that verifies there).

A stage's command line: `stage=<name>`, its `overrides`, then the pipeline's own command line
(it wins: `train.max_steps=5` shortens every stage) without the pipeline's own keys (`mode`,
`experiment`, `pipeline.*`, `hydra.*`); `model=`/`model.*` reach every stage, as
`train.init_from` needs the same model throughout; `train.init_from` there is where the first
stage starts. `stage=`, `data=` and `checkpoint=` belong to one stage: refused on the command line.
Every stage's config is composed and validated before the first one starts.

Requeue-safe: the same command with hydra.run.dir=RUN continues. A stage whose status.json says
`finished` is skipped; a stage that started and did not finish continues with train.resume=auto.
SIGINT/SIGTERM reach the running stage once (it saves a checkpoint and stops); if the pipeline
process dies without passing it on, the stage gets SIGTERM from the kernel (PR_SET_PDEATHSIG).
A stage that fails stops the pipeline with one line naming it and its log, and its exit code.
"""

from __future__ import annotations

import codecs
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from h64lm.config import CONF_DIR, RunConfig, build_run_config, did_you_mean, is_schema_key
from h64lm.runtime.console import command, hydra_value
from h64lm.runtime.rundir import RunDirLock
from h64lm.train.pipeline_table import stage_row, write_table
from h64lm.validation import ConfigError, check

__all__ = ["StageLaunch", "PipelineStopped", "stage_launches", "check_stage_configs", "run_stages", "merged"]

RUN_PY = Path(__file__).resolve().parents[2] / "run.py"
# keys of the pipeline's command line that configure the pipeline itself (exact keys; then prefixes)
_OWN_KEYS = {"mode", "experiment", "train.resume"}
_OWN_PREFIXES = ("pipeline", "hydra")
_PER_STAGE = ("stage", "data", "checkpoint")  # refused there: which stage would they be for?
EVAL_DIR = Path("evals") / "pipeline"  # inside a stage's folder: its final weights' mode=eval
LOCK_WAIT_S = 600  # a killed pipeline's stage process is still saving its checkpoint


def _key(override: str) -> str:
    return override.lstrip("+~").partition("=")[0].strip()


def merged(*lists: list[str]) -> list[str]:
    """The overrides of all lists, one per key: a later list's value replaces an earlier one's."""
    by_key: dict[str, str] = {}
    for o in (o for lst in lists for o in lst):
        by_key.pop(_key(o), None)
        by_key[_key(o)] = o
    return list(by_key.values())


@dataclass
class StageLaunch:
    index: int
    name: str
    dir: Path  # RUN/stages/<index>_<name>
    args: list[str]  # run.py's overrides, hydra.run.dir last


class PipelineStopped(Exception):
    """The pipeline ends here with `exit_code`; the message is its one line."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def stage_launches(run: RunConfig, run_dir: Path, overrides: list[str]) -> list[StageLaunch]:
    """The stages up to `pipeline.until`, each with its full command line."""
    p = run.pipeline
    stages = p.stages[:[s.name for s in p.stages].index(p.until) + 1] if p.until else p.stages
    for o in overrides:
        check(_key(o) not in _PER_STAGE, f"{o} on a pipeline's command line: each stage sets its own "
              f"{_key(o)}; put it in the overrides of one stage (pipeline.stages[k].overrides)")
    passed = [o for o in overrides if _key(o) not in _OWN_KEYS and not _key(o).startswith(_OWN_PREFIXES)]
    group = [f"experiment_name={run.experiment_name}"] if run.experiment_name else []  # the W&B group
    # train.init_from on the command line: where the first stage starts; each later one starts
    # from the stage before
    first_init = [o for o in passed if _key(o) == "train.init_from"]
    passed = [o for o in passed if _key(o) != "train.init_from"]
    launches, previous = [], None
    for k, s in enumerate(stages):
        folder = Path(run_dir).absolute() / "stages" / f"{k}_{s.name}"
        init = [f"train.init_from={hydra_value(previous)}"] if previous else first_init
        args = merged([f"stage={s.name}"], group, list(s.overrides), passed, init)
        launches.append(StageLaunch(k, s.name, folder, args + [f"hydra.run.dir={hydra_value(folder)}"]))
        previous = folder
    return launches


def _compose(args: list[str]):
    """`args` composed as `python run.py args` would: through the running Hydra app when there is
    one (run.py), else a fresh composition (tests calling `cli.run`)."""
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        from hydra import compose

        return compose(config_name="config", overrides=args)
    from h64lm.config import compose

    return compose(args)


def check_stage_configs(launches: list[StageLaunch]) -> None:
    """Every stage's config composes and validates, before anything runs: a typo in the last
    stage's overrides is one line now, not after the first stages have trained."""
    groups = {p.name for p in CONF_DIR.iterdir() if p.is_dir()}
    for launch in launches:
        args = [a for a in launch.args if not _key(a).startswith("hydra")]
        where = f"pipeline stage {launch.index} ({launch.name})"
        for key in (_key(a) for a in args if not a.startswith(("+", "~"))):
            guess = did_you_mean(key, tuple(groups))
            check(key in groups or is_schema_key(key), f"{where}: {key} is not a configuration key"
                  f"{f'; did you mean {guess}?' if guess else ''}; change pipeline.stages[{launch.index}].overrides")
        try:
            with warnings.catch_warnings():  # the stage itself prints its start-up warnings
                warnings.simplefilter("ignore")
                build_run_config(_compose(args))
        except Exception as e:
            raise ConfigError(f"{where}: "
                              f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}; "
                              f"change pipeline.stages[{launch.index}].overrides") from None


def _die_with_parent(parent: int) -> Callable[[], None]:
    """For the child, before exec: SIGTERM when the pipeline process dies (Linux prctl
    PR_SET_PDEATHSIG), so a killed pipeline never leaves a stage training on its own."""
    def set_signal() -> None:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):  # not Linux: a killed pipeline's stage runs to its end
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            signal.raise_signal(signal.SIGTERM)
    return set_signal


class _StageProcess:
    """One `python run.py` at a time. The pipeline's SIGINT/SIGTERM goes to it once (it runs in
    its own session, so a terminal's Ctrl-C does not reach it twice); `signum` remembers it. Its
    stderr is kept in a file beside its folder and its end here (`tail`): a stage that refuses to
    start removes its own folder, run.log included."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.signum = 0
        self.tail = ""
        self._previous: dict = {}

    def __enter__(self) -> "_StageProcess":
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signum)

    def run(self, args: list[str], err_log: Path) -> int:
        """`run.py args`; its stderr appended to `err_log` (a file, not a pipe: the stage never
        depends on this process staying alive) and copied to this process's stderr as it grows.
        This thread waits and copies; no other is started: the kernel sends PR_SET_PDEATHSIG
        again each time a thread of a killed parent exits, and a stage's second SIGTERM kills
        it before it has saved."""
        sys.stdout.flush()
        self.tail = ""
        err_log.parent.mkdir(parents=True, exist_ok=True)
        with open(err_log, "ab") as err:
            start = err.tell()
            self.proc = subprocess.Popen([sys.executable, str(RUN_PY), *args], start_new_session=True,
                                         stderr=err, preexec_fn=_die_with_parent(os.getpid()))
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        try:
            with open(err_log, "rb") as f:
                f.seek(start)
                while True:
                    rc = self.proc.poll()
                    while chunk := f.read(65536):  # after poll: all the stage wrote before it ended
                        text = decoder.decode(chunk)
                        sys.stderr.write(text)
                        sys.stderr.flush()
                        self.tail = (self.tail + text)[-8192:]
                    if rc is not None:
                        return rc
                    time.sleep(0.1)
        finally:
            self.proc = None

    def last_error(self) -> str:
        """The stage's last `error:` line (the one line every refusal and failure prints)."""
        lines = [ln.strip() for ln in self.tail.replace("\r", "\n").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or [""])[-1][:300]


def _state(stage_dir: Path) -> str | None:
    try:
        return json.loads((stage_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError, AttributeError):
        return None


def _wait_for_lock(stage_dir: Path, log: Callable[[str], None]) -> None:
    """The stage's run-directory lock, free: a pipeline killed a moment ago may have left its
    stage process saving a checkpoint (this pipeline holds RUN's lock, so no live copy does)."""
    if not (stage_dir / ".lock").exists():
        return
    deadline, said = time.monotonic() + LOCK_WAIT_S, False
    while True:
        try:
            RunDirLock(stage_dir).acquire().release()
            return
        except ConfigError as e:
            if time.monotonic() > deadline:
                raise ConfigError(f"{e} (waited {LOCK_WAIT_S} s)") from None
            if not said:
                log(f"waiting for the process still running in {stage_dir} to stop")
                said = True
            time.sleep(1.0)


def _previous_walls(run_dir: Path) -> dict[str, float]:
    """Each stage's wall time so far (RUN/pipeline.json), so a requeued pipeline adds to it."""
    try:
        rows = json.loads((run_dir / "pipeline.json").read_text())["stages"]
        return {r["dir"]: r["wall_s"] for r in rows}
    except (OSError, ValueError, KeyError, TypeError):
        return {}


def _stopped(signum: int, launch: StageLaunch, resume: str) -> PipelineStopped:
    return PipelineStopped(f"{signal.Signals(signum).name} received: pipeline stopped at stage {launch.index} "
                           f"({launch.name}); continue with: {resume}", 128 + signum)


def _err_log(launch: StageLaunch) -> Path:
    return launch.dir.with_name(launch.dir.name + ".stderr.log")


def _failed(launch: StageLaunch, rc: int, cause: str, resume: str) -> PipelineStopped:
    how = f"was killed by {signal.Signals(-rc).name}" if rc < 0 else f"failed (exit {rc})"
    log = launch.dir / "run.log"  # absent when the stage refused to start (it leaves nothing)
    return PipelineStopped(f"error: pipeline stage {launch.index} ({launch.name}) {how}"
                           f"{': ' + cause if cause else ''}; its log: {log if log.is_file() else _err_log(launch)}; "
                           f"fix it and continue with: {resume}", rc if rc > 0 else 128 - rc)


def run_stages(run: RunConfig, run_dir: Path, overrides: list[str], launches: list[StageLaunch],
               log: Callable[[str], None] = lambda s: print(s, flush=True)) -> list[dict]:
    """Runs (or skips, or continues) each launch, evaluates its final weights with
    `pipeline.eval_overrides`, and rewrites RUN/pipeline.{md,json} after each. -> the rows."""
    run_dir = Path(run_dir).absolute()
    resume = command([o for o in overrides if not o.startswith("hydra.run.dir=")]
                     + [f"hydra.run.dir={hydra_value(run_dir)}"])
    hardware = [o for o in overrides if _key(o).startswith("hardware")]
    walls, rows = _previous_walls(run_dir), []
    log(f"pipeline {run_dir}: {' -> '.join(x.name for x in launches)}; rerun to continue: {resume}")
    with _StageProcess() as proc:
        for launch in launches:
            rel = str(launch.dir.relative_to(run_dir))
            if _state(launch.dir) == "finished":
                log(f"stage {launch.index} ({launch.name}): finished earlier, skipped ({launch.dir})")
            else:
                # a folder an earlier attempt left: its checkpoints, or none yet (then step 0)
                again = ["train.resume=auto"] if launch.dir.exists() else []
                log(f"stage {launch.index} ({launch.name}){' continues' if again else ''}: "
                    f"{command(launch.args[:-1] + again)} in {launch.dir}")
                _wait_for_lock(launch.dir, log)
                start = time.perf_counter()
                rc = proc.run(launch.args + again, _err_log(launch))
                walls[rel] = walls.get(rel, 0.0) + time.perf_counter() - start
                if proc.signum:
                    write_table(run_dir, rows + [stage_row(launch.index, launch.name, launch.dir, walls[rel])])
                    raise _stopped(proc.signum, launch, resume)
                if rc != 0 or _state(launch.dir) != "finished":
                    write_table(run_dir, rows + [stage_row(launch.index, launch.name, launch.dir, walls[rel])])
                    raise _failed(launch, rc, proc.last_error(), resume)
            eval_dir = launch.dir / EVAL_DIR
            if run.pipeline.eval_overrides and not (eval_dir / "eval.json").is_file():
                args = merged(["mode=eval", f"checkpoint={hydra_value(launch.dir)}"], hardware,
                              list(run.pipeline.eval_overrides), [f"hydra.run.dir={hydra_value(eval_dir)}"])
                log(f"stage {launch.index} ({launch.name}): evaluating its final weights: {command(args[:-1])}")
                rc = proc.run(args, _err_log(launch))
                if proc.signum:
                    raise _stopped(proc.signum, launch, resume)
                if rc != 0:
                    log(f"warning: stage {launch.index} ({launch.name}): its evaluation failed (exit {rc}): "
                        f"{proc.last_error()}; the table leaves its exact match empty")
            rows.append(stage_row(launch.index, launch.name, launch.dir, walls.get(rel), eval_dir))
            write_table(run_dir, rows)
    log(f"pipeline done: {run_dir / 'pipeline.md'}")
    return rows
