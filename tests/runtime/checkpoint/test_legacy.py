"""Runs written before this layout: a one-process `.pt` run resumes bit for bit and evaluates; a
previous-layout sharded directory is refused in one line naming the upgrade command, which
checks it, adopts it, and then it loads like a new one."""

import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from h64lm.cli import run
from h64lm.runtime.checkpoint import MANIFEST, CheckpointError, load_trained_model, read_full_state
from h64lm.runtime.distributed import Dist
from h64lm.train.loop import Trainer
from h64lm.train.metrics import read_metrics
from h64lm.train.resume import find_resume_state
from tests.helpers import FAST, ROOT, run_config, text_corpus

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """6 uninterrupted steps in the new layout, checkpoints at 3 and 6."""
    tmp = tmp_path_factory.mktemp("legacy")
    base = FAST + ["data=text", f"data.path={text_corpus(tmp)}", "train.keep_last=5"]
    run(run_config(base), tmp / "full", base)
    return tmp, base


def _legacy_pt_run(tmp, base):
    """The previous one-process layout: `Trainer.state_dict()` (extras + model + optimizer) in one
    torch.save file, its SHA-256 in `NAME.sha256`, `last.pt` a hard link to the newest step."""
    at3 = base + [f"train.resume={tmp / 'full' / 'checkpoints' / 'step_0000003'}"]
    trainer = Trainer(run_config(at3), tmp / "scratch", at3, Dist(rank=0, world_size=1, device=CPU),
                      log=lambda s: None)
    ckpts = tmp / "old_pt" / "checkpoints"
    ckpts.mkdir(parents=True)
    path = ckpts / "step_0000003.pt"
    torch.save(trainer.state_dict(), path)
    (ckpts / "step_0000003.pt.sha256").write_text(
        f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")
    os.link(path, ckpts / "last.pt")
    os.link(ckpts / "step_0000003.pt.sha256", ckpts / "last.pt.sha256")
    return tmp / "old_pt"


def test_legacy_pt_run_resumes_bit_exact_and_evaluates(full_run):
    tmp, base = full_run
    old = _legacy_pt_run(tmp, base)
    model, _ = load_trained_model(old, CPU)  # mode=eval / generate / export load this way
    expected = read_full_state(tmp / "full" / "checkpoints" / "step_0000003")["model"]
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    more = base + ["train.resume=auto"]
    run(run_config(more), old, more)
    full = {r["step"]: r["loss"] for r in read_metrics(tmp / "full" / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_metrics(old / "metrics.jsonl")}
    assert sorted(again) == [4, 5, 6] and all(again[s] == full[s] for s in again)
    # the new saves took over: last names a directory, the legacy last.pt link went
    assert (old / "checkpoints" / "last").read_text().strip() == "step_0000006"
    assert not (old / "checkpoints" / "last.pt").exists()


def _previous_dcp_layout(tmp, name="old_dcp"):
    """The previous sharded layout: the same DCP files and extras, a `.complete` marker holding the
    SHA-256 of `.metadata` only, no manifest."""
    old = tmp / name / "checkpoints" / "step_0000003"
    shutil.copytree(tmp / "full" / "checkpoints" / "step_0000003", old)
    (old / MANIFEST).unlink()
    digest = hashlib.sha256((old / ".metadata").read_bytes()).hexdigest()
    (old / ".complete").write_text(json.dumps({"metadata_sha256": digest, "world_size": 1}))
    return old


def _upgrade(path):
    return subprocess.run([sys.executable, "-m", "h64lm.runtime.checkpoint", "upgrade", str(path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_previous_sharded_layout_is_refused_then_upgraded(full_run):
    tmp, base = full_run
    old = _previous_dcp_layout(tmp)
    lines = []
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies"):
        find_resume_state("auto", old.parent.parent, 6, lines.append)
    assert any(f"upgrade {old}" in line for line in lines), lines
    with pytest.raises(CheckpointError, match=r"python -m h64lm.runtime.checkpoint upgrade"):
        load_trained_model(old, CPU)
    done = _upgrade(old)
    assert done.returncode == 0, done.stderr
    model, _ = load_trained_model(old, CPU)
    expected = read_full_state(tmp / "full" / "checkpoints" / "step_0000003")["model"]
    assert all(torch.equal(model.state_dict()[k], expected[k]) for k in expected)
    assert find_resume_state("auto", old.parent.parent, 6, print)["step"] == 3


def test_upgrade_refuses_a_damaged_previous_layout(full_run):
    tmp, _ = full_run
    target = _previous_dcp_layout(tmp, "damaged")
    shard = next(target.glob("__0_*.distcp"))
    shard.write_bytes(shard.read_bytes()[:1000])  # the old marker never covered the shards
    done = _upgrade(target)
    assert done.returncode == 4 and "shorter than .metadata says" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (target / MANIFEST).exists()
