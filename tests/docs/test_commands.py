"""Every fenced `bash` command of README.md and docs/*.md is checked, and run where it can be.

- Every command's needs are marked (`<!-- needs: gpu -->` ...) where it visibly needs a GPU,
  torchrun, the network, SLURM or minutes (tests/docs/commands.py says how they are read).
- Every `run.py` command (torchrun and multiruns included) composes into a valid `RunConfig`, so a
  stale key or option fails here; a sweep's axes are composed too; a script under experiments/
  accepts its arguments; a `python -c` snippet compiles.
- Executed, with small overrides, in a scratch folder: the first command of each kind in the
  default run (about a minute on 2 cores), every other one that needs nothing out of reach in the
  slow run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import runpy
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf, open_dict

from h64lm.config import build_run_config, compose, default_run_dir
from h64lm.data.wiki import excerpt_text
from tests.docs.commands import (
    NEEDS,
    ROOT,
    UNREACHABLE,
    DocCommand,
    cut_sweep,
    doc_commands,
    first_of_each_kind,
    is_multirun,
    kind,
    producers,
    required_needs,
    run_py_args,
    small_overrides,
    sweep_axes,
)

COMMANDS = doc_commands()
FAST = first_of_each_kind(COMMANDS)
# Run in the slow run: run.py commands (cut short), snippets, and the scripts that are quick once
# their input exists (a benchmark or the fault injector takes its minutes whatever its arguments).
EXECUTABLE = [c for c in COMMANDS
              if not c.needs & UNREACHABLE and (run_py_args(c) is not None or c.argv[:2] == ("python", "-c")
                                                or c.argv[1:2] == ("experiments/report.py",))]


def _id(cmd: DocCommand) -> str:
    return f"{cmd.file}:{cmd.line}"


def test_commands_are_found():
    """The extraction sees the README's two first commands and the docs' blocks."""
    assert COMMANDS[0].argv == ("python3", "-m", "venv", ".venv")
    assert ("python", "-m", "pytest", "-q") in [c.argv for c in COMMANDS if c.file == "README.md"][:6]
    assert {c.file for c in COMMANDS} >= {"README.md", "docs/outputs.md", "docs/scaling.md"}


def test_readme_test_command_is_the_ci_command():
    """.ci/run runs the README's test command: the two must stay the same."""
    readme_test = next(c for c in COMMANDS if c.argv[:3] == ("python", "-m", "pytest"))
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert ci == [shlex.join(readme_test.argv)]


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_needs_are_marked(cmd: DocCommand):
    assert cmd.needs <= NEEDS, f"{cmd}: unknown needs {sorted(cmd.needs - NEEDS)}; known: {sorted(NEEDS)}"
    missing = required_needs(cmd) - cmd.needs
    assert not missing, f"{cmd}: add `<!-- needs: {', '.join(sorted(missing))} -->` before its block"


def _placeholders(args: list[str], base_run: Path, work: Path) -> list[str]:
    """Doc placeholders -> real paths: RUN / RUN_DIR (a trained run), /my/corpus.jsonl and
    file.txt (local corpora), multirun/NAME/<time> (the newest sweep), step_NNNNNNN[.pt] (the
    oldest step checkpoint of that run)."""
    out = []
    for a in args:
        a = re.sub(r"(?<==)RUN(_DIR)?\b", str(base_run), a)
        a = a.replace("/my/corpus.jsonl", str(work / "corpus.jsonl")).replace("=file.txt", f"={work / 'corpus.txt'}")
        m = re.fullmatch(r"(multirun/[\w.-]+)/<time>", a)
        if m:
            found = sorted((work / m.group(1)).iterdir())
            a = str(found[-1]) if found else a
        m = re.fullmatch(r"(.*=)?(.*/checkpoints)/step_\d{7}(\.pt)?", a)
        if m:
            found = sorted((work / m.group(2)).glob("step_*" + (m.group(3) or "")))
            a = (m.group(1) or "") + (str(found[0]) if found else m.group(2) + "/missing")
        out.append(a)
    return out


def _overrides_only(args: list[str]) -> list[str]:
    return [a for a in args if not a.startswith("-") and a != "job"]


def _compose(overrides: list[str]):
    cfg = compose(overrides, return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    params = {} if params is None else OmegaConf.to_container(params)
    with open_dict(cfg):
        del cfg["hydra"]
    build_run_config(cfg)
    return params


@pytest.mark.parametrize("cmd", COMMANDS, ids=_id)
def test_keys_and_arguments(cmd: DocCommand, tmp_path: Path, monkeypatch):
    """A stale key, option or script argument in a documented command fails here."""
    args = run_py_args(cmd)
    if args is not None:
        overrides = _overrides_only(_placeholders(args, tmp_path, tmp_path))
        if is_multirun(args):  # every axis of the sweep, at its first value
            params = _compose([o for o in overrides if "," not in o.partition("=")[2] and "range(" not in o])
            first = [f"{k}={v[0]}" for k, v in sweep_axes(overrides, params).items()]
            overrides = [o for o in overrides if o.partition("=")[0] not in {f.partition("=")[0] for f in first}]
            overrides += first
        _compose(overrides)
    elif cmd.argv[:2] == ("python", "-c"):
        compile(cmd.argv[2], str(cmd), "exec")
    elif any(a.startswith("experiments/") and a.endswith(".py") for a in cmd.argv):
        _parse_script_args(cmd, monkeypatch)
    elif cmd.argv[0] == "bash":
        script = ROOT / cmd.argv[1]
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, f"{cmd}: not valid bash"
    elif cmd.argv[:2] == ("pip", "install"):
        assert (ROOT / cmd.argv[cmd.argv.index("-r") + 1]).is_file()
    elif cmd.argv[0] == "lm_eval":
        pytest.importorskip("lm_eval", reason="lm-eval is pinned in requirements.txt")
    else:
        assert cmd.argv[0] in {"python3", ".", "python"}, f"{cmd}: a kind of command this test does not know"


class _Parsed(Exception):
    pass


def _parse_script_args(cmd: DocCommand, monkeypatch) -> None:
    """Run the script's own argparse on the documented arguments, and stop there."""
    i = next(i for i, a in enumerate(cmd.argv) if a.startswith("experiments/"))
    script = ROOT / cmd.argv[i]
    assert script.is_file(), f"{cmd}: {script} does not exist"
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_and_stop)
    monkeypatch.setattr(sys, "argv", [str(script), *cmd.argv[i + 1:]])
    with pytest.raises(_Parsed):
        try:
            runpy.run_path(str(script), run_name="__main__")
        except SystemExit as e:
            pytest.fail(f"{cmd}: its arguments are refused (exit {e.code})")


# --- execution ---------------------------------------------------------------------------------

def _env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def _corpora(work: Path) -> None:
    """corpus.txt and val.txt (enough sentences for the local downstream tasks' 200 examples), and
    corpus.jsonl with a `body` field, all real Wikipedia text."""
    text = excerpt_text(180_000)
    (work / "corpus.txt").write_text(text[:120_000])
    (work / "val.txt").write_text(text[120_000:])
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    (work / "corpus.jsonl").write_text("".join(json.dumps({"body": p}) + "\n" for p in paragraphs))


def _run(argv: list[str], work: Path, what: str) -> None:
    proc = subprocess.run(argv, cwd=work, env=_env(), capture_output=True, text=True, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{what}\nran: {shlex.join(argv)}\nexit {proc.returncode}:\n{tail}"


def _argv(cmd: DocCommand, work: Path, base_run: Path) -> list[str]:
    """The command as this test runs it: placeholders filled, small overrides appended, a sweep
    cut to 2 jobs."""
    args = run_py_args(cmd)
    if args is not None:
        args = _placeholders(args, base_run, work)
        extra = small_overrides(args, work / "corpus.txt")
        if is_multirun(args):
            overrides = _overrides_only(args)
            params = _compose([o for o in overrides if "," not in o.partition("=")[2] and "range(" not in o])
            cut = cut_sweep(sweep_axes(overrides, params))
            cut_keys = {c.partition("=")[0] for c in cut}
            args = [a for a in args if a.partition("=")[0] not in cut_keys] + cut
        return [sys.executable, str(ROOT / "run.py"), *args, *extra]
    if cmd.argv[:2] == ("python", "-c"):
        return [sys.executable, *cmd.argv[1:]]
    i = next(i for i, a in enumerate(cmd.argv) if a.startswith("experiments/"))
    return [sys.executable, str(ROOT / cmd.argv[i]), *_placeholders(list(cmd.argv[i + 1:]), base_run, work)]


def _execute(cmd: DocCommand, work: Path, base_run: Path) -> None:
    _run(_argv(cmd, work, base_run), work, str(cmd))


_LAUNCHES = itertools.count()


def _execute_in_process(cmd: DocCommand, work: Path, base_run: Path, monkeypatch) -> None:
    """What run.py does after Hydra composed the config (`h64lm.cli.run`, as the other tests call
    it), in this process: no interpreter start, no import of torch and transformers again."""
    from h64lm.cli import run

    monkeypatch.chdir(work)
    argv = _argv(cmd, work, base_run)
    if argv[1] == "-c":
        exec(compile(argv[2], str(cmd), "exec"), {})
        return
    assert argv[1].endswith("run.py") and not is_multirun(argv), f"{cmd}: run it in a process"
    overrides = _overrides_only(argv[2:])
    run_cfg = build_run_config(compose([o for o in overrides if not o.startswith("hydra.")]))
    run_dir = next((o.partition("=")[2] for o in overrides if o.startswith("hydra.run.dir=")), None)
    stamp = f"2000-01-01/00-00-{next(_LAUNCHES):02d}"  # the run directory Hydra's ${now:} would name
    run_dir = Path(run_dir or default_run_dir(run_cfg.mode, run_cfg.checkpoint, stamp))
    threads = torch.get_num_threads()  # hardware.num_threads=1 must not outlive this run
    try:
        run(run_cfg, run_dir, overrides)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """The run that `RUN` stands for in the docs: trained for 2 steps with the small overrides."""
    work = tmp_path_factory.mktemp("docs_base")
    _corpora(work)
    run = work / "runs" / "base"
    _run([sys.executable, str(ROOT / "run.py"), f"hydra.run.dir={run}",
          *small_overrides([], work / "corpus.txt")], work, "the base run")
    return run


def _execute_with_producers(cmd: DocCommand, tmp_path: Path, base_run: Path, monkeypatch=None) -> None:
    _corpora(tmp_path)
    for c in [*producers(cmd, COMMANDS), cmd]:
        if monkeypatch is None:
            _execute(c, tmp_path, base_run)
        else:
            _execute_in_process(c, tmp_path, base_run, monkeypatch)


@pytest.mark.parametrize("cmd", FAST, ids=lambda c: f"{kind(c)} {_id(c)}")
def test_runs(cmd: DocCommand, tmp_path: Path, base_run: Path, monkeypatch):
    """The first executable command of each kind runs, after the commands whose outputs it reads;
    in this process (the base run above went through run.py in its own)."""
    _execute_with_producers(cmd, tmp_path, base_run, monkeypatch)


@pytest.mark.slow  # every documented command, each in its own process(es): ~10-40 s apiece on 2 cores
@pytest.mark.parametrize("cmd", EXECUTABLE, ids=_id)
def test_runs_all(cmd: DocCommand, tmp_path: Path, base_run: Path):
    """Every executable documented command, through run.py (or its script) in a process."""
    _execute_with_producers(cmd, tmp_path, base_run)


def test_the_checks_catch_stale_commands(tmp_path: Path):
    """A stale key, a removed option and an unmarked GPU command in a doc are caught."""
    doc = tmp_path / "stale.md"
    doc.write_text("```bash\npython run.py model.hiden_size=1\npython run.py hardware=tpu\n"
                   "torchrun --nproc_per_node=8 run.py hardware=gpu \\\n    model=demo   # one node\n```\n")
    typo, option, gpu = doc_commands([doc], root=tmp_path)
    assert gpu.argv[-1] == "model=demo" and gpu.line == 4
    for cmd in (typo, option):
        with pytest.raises(Exception):
            _compose(_overrides_only(run_py_args(cmd)))
    assert required_needs(gpu) - gpu.needs == {"gpu", "torchrun"}
