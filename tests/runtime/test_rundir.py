"""A run directory's owner, its provenance across launches, and the resume rules that protect it."""

import hashlib
import json
import subprocess
import sys
import time

import pytest
import yaml

from h64lm.cli import run
from h64lm.runtime.checkpoint import CheckpointError
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import FAST, run_cli, run_config, text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"))


def _snapshot(run_dir) -> dict[str, str]:
    """Every file of a run directory with its content hash (the lock file's holder text aside)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and p.name != ".lock"}


def test_resumes_keep_the_original_provenance_and_refused_launches_change_nothing(tmp_path, corpus):
    run_dir = tmp_path / "run"
    base = FAST + ["data=text", f"data.path={corpus}", f"hydra.run.dir={run_dir}"]
    first = run_cli(base + ["train.max_steps=3"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    config, overrides = (run_dir / ".hydra/config.yaml").read_text(), (run_dir / ".hydra/overrides.yaml").read_text()
    assert "train.max_steps=3" in yaml.safe_load(overrides)

    refused = run_cli(base + ["train.max_steps=5", "train.resume=auto", "model.num_experts=2"], cwd=tmp_path)
    assert refused.returncode == 2 and "model.num_experts (4 -> 2)" in refused.stderr
    before = _snapshot(run_dir)
    again = run_cli(base + ["train.max_steps=5", "train.resume=auto", "model.num_experts=2"], cwd=tmp_path)
    assert again.returncode == 2
    after = _snapshot(run_dir)
    assert {k: v for k, v in after.items() if k != "run.log"} == {k: v for k, v in before.items() if k != "run.log"}

    resumed = run_cli(base + ["train.max_steps=5", "train.resume=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert (run_dir / ".hydra/config.yaml").read_text() == config  # what the run was trained with
    assert (run_dir / ".hydra/overrides.yaml").read_text() == overrides
    launches = sorted((run_dir / ".hydra/launches").iterdir())
    assert len(launches) == 2  # the first launch and the resume; the refused ones left no record
    assert "train.resume=auto" in yaml.safe_load((launches[1] / "overrides.yaml").read_text())
    log = (run_dir / "run.log").read_text()
    assert "resuming from" in log and log.rstrip().splitlines()[-1].startswith(f"done: {run_dir}")


def test_a_second_live_run_in_the_directory_is_refused(tmp_path, corpus):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from h64lm.runtime.rundir import RunDirLock; "
         "RunDirLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=2"]
        with pytest.raises(ConfigError, match=f"another run is training in {tmp_path}.*\"pid\": {holder.pid}"):
            run(run_config(args), tmp_path, args)
        assert not (tmp_path / "metrics.jsonl").exists()
    finally:
        holder.kill()
        holder.wait()
    # The holder died without releasing: its lock died with it, and the next run takes over.
    run(run_config(args), tmp_path, args)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


def _corrupt(checkpoint) -> None:
    """Damage a checkpoint's shard (best/ may hold hard links to a step's files: break the link first)."""
    path = next(checkpoint.glob("__0_*.distcp"))
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data[:100])


def test_resume_auto_falls_back_to_best_and_never_restarts_a_run(tmp_path, corpus):
    args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=6", "train.eval_every=2",
                   "train.save_every=2"]
    run(run_config(args), tmp_path, args)
    ckpts = tmp_path / "checkpoints"
    for p in ckpts.glob("step_*"):
        _corrupt(p)
    best_weights = (tmp_path / "best_model.safetensors").read_bytes()
    more = args[:-3] + ["train.max_steps=8", "train.eval_every=2", "train.save_every=2", "train.resume=auto"]
    run(run_config(more), tmp_path, more)  # best/ verifies: it continues from there
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    best_step = json.loads((tmp_path / "summary.json").read_text())["step"]
    assert best_step == 8 and steps == sorted(set(steps)) and steps[-1] == 8  # no step logged twice

    for p in [*ckpts.glob("step_*"), ckpts / "best"]:
        _corrupt(p)
    best_weights = (tmp_path / "best_model.safetensors").read_bytes()
    metrics = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(CheckpointError, match="refusing to restart it from step 0"):
        run(run_config(more[:-1] + ["train.max_steps=10", "train.resume=auto"]), tmp_path, more)
    assert (tmp_path / "best_model.safetensors").read_bytes() == best_weights
    assert (tmp_path / "metrics.jsonl").read_text() == metrics


def test_resume_rules_say_what_is_wrong(tmp_path, corpus, capsys):
    args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=3"]
    with pytest.raises(ConfigError, match="train.resume=/missing.pt"):
        run(run_config(args + ["train.resume=/missing.pt"]), tmp_path / "a", args)
    run(run_config(args + ["train.resume=auto"]), tmp_path / "b", args)
    assert "holds no run yet (a new directory)" in capsys.readouterr().out + capsys.readouterr().err
    with pytest.raises(ConfigError, match="already at step 3 >= train.max_steps=3"):
        run(run_config(args + ["train.resume=auto"]), tmp_path / "b", args)


def test_a_torn_metrics_line_is_dropped_on_resume(tmp_path, corpus):
    args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=3"]
    run(run_config(args), tmp_path, args)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "loss": 3.1')  # a kill in the middle of a write
    more = args[:-1] + ["train.max_steps=5", "train.resume=auto"]
    run(run_config(more), tmp_path, more)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    assert all(line.startswith("{") and line.endswith("}")
               for line in (tmp_path / "metrics.jsonl").read_text().splitlines())


def test_stop_during_evaluation_saves_within_seconds(tmp_path, corpus, monkeypatch):
    """SIGTERM while a long evaluation runs: the loop notices between validation batches."""
    import os
    import signal

    from h64lm.eval import validation
    from h64lm.runtime.control import TrainingStopped

    real = validation.evaluate
    calls = []

    def slow_evaluate(model, windows, batch, precision, d, should_stop):
        os.kill(os.getpid(), signal.SIGTERM)  # arrives at the start of a long evaluation

        def stop_later():
            calls.append(time.monotonic())
            return should_stop()
        return real(model, windows, 1, precision, d, stop_later)

    monkeypatch.setattr(validation, "evaluate", slow_evaluate)
    args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=6", "data.val_windows=64"]
    with pytest.raises(TrainingStopped) as stopped:
        run(run_config(args), tmp_path, args)
    assert stopped.value.signum == signal.SIGTERM and stopped.value.checkpoint.name == "step_0000003"
    assert len(calls) == 1  # stopped before the first of 64 batches, not after all of them
