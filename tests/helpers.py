"""Shared test helpers: compose configs the way run.py does, run it in-process or as a subprocess."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from experiments.fault_procs import FAST, ROOT, run_cli, text_corpus
from h64lm.config import CONF_DIR as CONF
from h64lm.config import RunConfig, build_run_config
from h64lm.config import compose as compose_cfg

__all__ = ["CONF", "FAST", "ROOT", "compose_cfg", "fit_recording_batches", "one_and_two_processes", "run_cli",
           "run_config", "text_corpus", "tmpfs", "wandb_offline_records"]


@contextlib.contextmanager
def tmpfs(mnt: Path, options: str):
    """A small tmpfs mounted at `mnt` (`options`: e.g. "size=2M", "ro,size=1M"): a real full or
    read-only disk, the only way to deny root a write. Skips the test where it cannot be mounted."""
    import pytest

    mnt.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root and a kernel that lets this container mount one")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def run_config(overrides: list[str]) -> RunConfig:
    return build_run_config(compose_cfg(overrides))


def wandb_offline_records(run_dir: Path) -> list[dict]:
    """Every record of the W&B offline run under `run_dir`, read back with W&B's own inspector."""
    runs = sorted((Path(run_dir) / "wandb").glob("offline-run-*"))
    assert runs, f"no W&B offline run under {run_dir}/wandb"
    wandb_bin = shutil.which("wandb", path=str(Path(sys.executable).parent)) or "wandb"
    out = subprocess.run([wandb_bin, "leet", "inspect", "--json", str(runs[-1])],
                         capture_output=True, text=True, timeout=120, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]


def one_and_two_processes(common: list[str], tmp_path: Path) -> tuple[list[dict], list[dict]]:
    """metrics.jsonl records of `common` run by one process with train.batch_size=2 (in
    tmp_path/one) and by two gloo DDP processes under torchrun with train.batch_size=1 (tmp_path/two)."""
    from h64lm.train.metrics import read_metrics

    single = run_cli(common + ["train.batch_size=2", f"hydra.run.dir={tmp_path / 'one'}"], cwd=tmp_path)
    assert single.returncode == 0, single.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    double = run_cli(common + ["train.batch_size=1", "hardware=ddp", "hardware.device=cpu",
                               "hardware.precision=fp32", f"hydra.run.dir={tmp_path / 'two'}"],
                     cwd=tmp_path, launcher=torchrun)
    assert double.returncode == 0, double.stderr[-3000:]
    return read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")


def fit_recording_batches(args: list[str], run_dir: Path) -> tuple[list[dict], list[tuple[list, list]]]:
    """Train `args` in this process -> (metrics.jsonl records, per step (the loader's micro-batches,
    the micro-batches the step trained on: the objective's rollouts where it makes them))."""
    import torch

    from h64lm.runtime.distributed import Dist
    from h64lm.train.loop import Trainer
    from h64lm.train.metrics import read_metrics

    trainer = Trainer(run_config(args), run_dir, args, Dist(0, 1, torch.device("cpu")))
    steps, prepare = [], trainer.objective.prepare_step

    def recording(model, batches):
        prepared = prepare(model, batches)
        steps.append((list(batches), list(batches if prepared is None else prepared)))
        return prepared

    trainer.objective.prepare_step = recording
    trainer.fit()
    return read_metrics(run_dir / "metrics.jsonl"), steps
