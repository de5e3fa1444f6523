"""mode=pipeline: stages in order, each initialised from the one before, checked before anything
runs, one pipeline per folder; end to end (slow): the table equals the stages' own numbers, a
rerun skips finished stages, a killed pipeline resumes its interrupted stage, a failing stage
stops it with one line."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from experiments.fault_procs import start_run, wait_until
from h64lm.cli import run
from h64lm.config import build_run_config
from h64lm.train.callbacks import RoutingSnapshots, default_callbacks
from h64lm.train.metrics import read_metrics
from h64lm.train.pipeline import check_stage_configs, merged, stage_launches
from h64lm.validation import ConfigError
from tests.helpers import FAST, ROOT, compose_cfg, run_cli, run_config

MODEL = [a for a in FAST if a.startswith(("model", "hardware", "logger"))] + ["hardware.num_threads=1"]
PRETRAIN = ["data.seq_len=32", "data.val_windows=4", "train.max_steps=4", "train.eval_every=2",
            "train.save_every=2", "train.batch_size=2", "optim.warmup_steps=1", "train.sample_tokens=0"]
SFT = ["data=arithmetic", "data.seq_len=96", "data.max_samples=200", "data.val_windows=4", "train.max_steps=4",
       "train.eval_every=2", "train.save_every=2", "train.batch_size=2", "optim.warmup_steps=1",
       "train.sample_tokens=0", "stage.eval_examples=6", "stage.eval_max_new_tokens=8"]
# mode=eval with the SFT stage's exact-match settings and batch: its score must equal the stage's own
EVAL = ["data=arithmetic", "data.seq_len=96", "data.val_windows=4", "stage.eval_examples=6",
        "stage.eval_max_new_tokens=8", "train.batch_size=2"]


def _hydra_list(items: list[str]) -> str:
    return "[" + ",".join(f'"{i}"' for i in items) + "]"


def pipeline_args(pretrain=PRETRAIN, sft=SFT, evaluation=EVAL) -> list[str]:
    stages = (f"[{{name:pretrain,overrides:{_hydra_list(pretrain)}}},"
              f"{{name:sft,overrides:{_hydra_list(sft)}}}]")
    return ["mode=pipeline", f"pipeline.stages={stages}", f"pipeline.eval_overrides={_hydra_list(evaluation)}",
            *MODEL]


# --- before anything runs -------------------------------------------------------------------------

@pytest.mark.parametrize("override, message", [
    ("pipeline.stages.1.name=sftt", r"pipeline\.stages\[1\]\.name=sftt is not a stage; did you mean sft\?"),
    ("pipeline.stages.1.name=pretrain", r"pipeline\.stages\[1\]\.name=pretrain names two stages"),
    ("pipeline.until=ppo", r"pipeline\.until=ppo is none of the stages \(pretrain, sft, dpo, rl\)"),
    ("pipeline.stages.0.overrides=[train.max_steps]", r"pipeline\.stages\[0\]\.overrides: 'train\.max_steps' is "
                                                      r"not key=value"),
    ("pipeline.stages.1.overrides=[\"hydra.run.dir=x\"]", r"hydra\.run\.dir is set by the pipeline itself"),
    ("pipeline.stages.1.overrides=[\"stage=pretrain\"]", r"stage is set by the pipeline itself"),
])
def test_a_bad_stage_entry_fails_at_compose_time(override, message):
    with pytest.raises(ConfigError, match=message):
        build_run_config(compose_cfg(["experiment=pipeline", override]))


def test_an_unknown_key_in_a_stage_entry_is_refused_by_the_schema():
    with pytest.raises(Exception, match="nmae"):
        compose_cfg(["experiment=pipeline", "pipeline.stages.0.nmae=sft"])


def test_the_preset_composes_and_every_stage_config_is_valid(tmp_path):
    cfg = run_config(["experiment=pipeline"])
    assert cfg.mode == "pipeline" and [s.name for s in cfg.pipeline.stages][:2] == ["pretrain", "sft"]
    launches = stage_launches(cfg, tmp_path, ["experiment=pipeline"])
    check_stage_configs(launches)  # raises on any stage that would be refused


def test_each_stage_starts_from_the_previous_and_the_command_line_reaches_every_stage(tmp_path):
    overrides = ["experiment=pipeline", "pipeline.until=sft", "train.max_steps=7", "model.hidden_size=64",
                 "train.init_from=outputs/base", "hydra.run.dir=elsewhere", "logger=none"]
    launches = stage_launches(run_config(overrides), tmp_path, overrides)
    assert [(x.index, x.name, x.dir) for x in launches] == [
        (0, "pretrain", tmp_path / "stages" / "0_pretrain"), (1, "sft", tmp_path / "stages" / "1_sft")]
    pre, sft = (dict(a.partition("=")[::2] for a in x.args) for x in launches)
    assert pre["stage"] == "pretrain" and sft["stage"] == "sft"
    # the command line's train.init_from is where the first stage starts
    assert pre["train.init_from"] == "outputs/base"
    assert sft["train.init_from"] == str(tmp_path / "stages" / "0_pretrain")
    for args, launch in ((pre, launches[0]), (sft, launches[1])):
        assert args["hydra.run.dir"] == str(launch.dir)  # not the pipeline's own
        assert args["train.max_steps"] == "7" and args["model.hidden_size"] == "64" and args["logger"] == "none"
        assert "mode" not in args and "experiment" not in args and "pipeline.until" not in args
    assert "data" not in pre and sft["data"] == "arithmetic"  # the stages' own
    assert len(launches[1].args) == len(sft)  # one value per key


@pytest.mark.parametrize("override", ["data=arithmetic", "stage=sft", "checkpoint=outputs/x"])
def test_a_key_that_belongs_to_one_stage_is_refused_on_the_pipelines_command_line(tmp_path, override):
    overrides = ["experiment=pipeline", override]
    with pytest.raises(ConfigError, match=f"^{override} on a pipeline's command line: each stage sets its own"):
        stage_launches(run_config(["experiment=pipeline"]), tmp_path, overrides)


def test_only_the_first_stage_entry_may_name_its_starting_weights():
    first = build_run_config(compose_cfg(["experiment=pipeline",
                                          "pipeline.stages.0.overrides=[\"train.init_from=x\"]"]))
    assert first.pipeline.stages[0].overrides == ["train.init_from=x"]
    with pytest.raises(ConfigError, match=r"pipeline\.stages\[1\]\.overrides: train\.init_from is set by the pipeline"):
        build_run_config(compose_cfg(["experiment=pipeline", "pipeline.stages.1.overrides=[\"train.init_from=x\"]"]))


def test_merged_keeps_one_override_per_key_the_last_one():
    assert merged(["a=1", "b=2"], ["+a=3", "c=4"], ["b=5"]) == ["+a=3", "c=4", "b=5"]


@pytest.mark.parametrize("override, message", [
    ("train.max_stepz=3", r"train\.max_stepz is not a configuration key; did you mean train\.max_steps\?"),
    ("train.max_steps=0", r"train\.max_steps=0 must be >= 1"),
    ("data=wiki_excerpt", r"stage=sft needs a data source of conversations"),
])
def test_a_bad_override_of_a_later_stage_is_refused_before_the_first_stage_runs(tmp_path, override, message):
    args = pipeline_args(sft=SFT + [override])
    with pytest.raises(ConfigError, match=r"^pipeline stage 1 \(sft\): " + message):
        run(run_config(args), tmp_path / "run", args)
    assert not (tmp_path / "run" / "stages").exists()


def test_a_second_copy_of_the_pipeline_in_the_same_folder_is_refused(tmp_path):
    """The folder's lock held by another process (a lock is per process: this one's own would
    not count), as the first copy of the pipeline holds it."""
    args = pipeline_args()
    (tmp_path / "run").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom h64lm.runtime.rundir import RunDirLock\n"
                               f"RunDirLock({str(tmp_path / 'run')!r}).acquire()\nprint('held', flush=True)\n"
                               "time.sleep(120)"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(ConfigError, match="another run is training in"):
            run(run_config(args), tmp_path / "run", args)
    finally:
        holder.kill()
        holder.wait()
    assert not (tmp_path / "run" / "stages").exists()


def test_every_stage_but_pretraining_measures_routing_against_its_starting_model():
    def against_start(overrides):
        [snapshots] = [c for c in default_callbacks(run_config(overrides)) if isinstance(c, RoutingSnapshots)]
        return snapshots.against_start

    assert not against_start([])
    assert against_start(["stage=sft", "data=arithmetic"])


# --- end to end -----------------------------------------------------------------------------------

def _stdout(result) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # four process starts and a rerun: 2-4 minutes on a shared 2-core machine
def test_pipeline_runs_both_stages_writes_their_numbers_and_a_rerun_skips_them(tmp_path):
    run_dir = tmp_path / "pipe"
    args = pipeline_args() + [f"hydra.run.dir={run_dir}"]
    out = _stdout(run_cli(args, cwd=tmp_path, timeout=900))
    pre, sft = run_dir / "stages" / "0_pretrain", run_dir / "stages" / "1_sft"
    rows = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [(r["name"], r["state"], r["steps"]) for r in rows] == [("pretrain", "finished", 4), ("sft", "finished", 4)]
    # the SFT stage started from the pretraining stage's final weights
    assert f"train.init_from: weights of {pre}" in (sft / "run.log").read_text()
    for row, stage in zip(rows, (pre, sft)):
        records = read_metrics(stage / "metrics.jsonl")
        evaluation = json.loads((stage / "evals" / "pipeline" / "eval.json").read_text())
        assert row["val_loss"] == [r["val_loss"] for r in records if "val_loss" in r][-1]
        assert (row["exact_match"], row["eval_val_loss"]) == (evaluation["sft/exact_match"], evaluation["val_loss"])
        solved = evaluation["exact_match_solved"]  # per problem, what the paired "vs previous" column reads
        assert row["exact_match_solved"] == solved and sum(solved) / len(solved) == evaluation["sft/exact_match"]
        assert row["wall_s"] > 0
    # mode=eval of the final weights scores what the stage's own last evaluation scored
    assert rows[1]["exact_match"] == json.loads((sft / "exact_match.json").read_text())["4"]
    assert rows[1]["eval_val_loss"] == pytest.approx(rows[1]["val_loss"], rel=1e-6)
    last = [r for r in read_metrics(sft / "metrics.jsonl") if "routing" in r][-1]["routing"]
    shifts = [layer["top1_changed_from_start"] for layer in last.values()]
    assert rows[1]["routing_shift"] == pytest.approx(sum(shifts) / len(shifts))
    assert rows[0]["routing_shift"] is None  # pretraining has no starting model to compare with
    assert "| 1 sft | 4 |" in (run_dir / "pipeline.md").read_text()
    assert out.count("evaluating its final weights") == 2

    before = {p: p.read_bytes() for p in (pre / "metrics.jsonl", sft / "metrics.jsonl", run_dir / "pipeline.json")}
    again = _stdout(run_cli(args, cwd=tmp_path, timeout=300))
    assert again.count("finished earlier, skipped") == 2 and "evaluating" not in again
    assert {p: p.read_bytes() for p in before} == before  # nothing retrained, same table


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "gone"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="watches the orphaned stage through /proc (Linux)")
@pytest.mark.slow  # 2-4 minutes: a kill during the second stage, then the rerun
def test_a_killed_pipeline_resumes_its_interrupted_stage(tmp_path):
    run_dir = tmp_path / "pipe"
    long_sft = SFT + ["train.max_steps=40", "train.eval_every=20"]
    args = pipeline_args(sft=long_sft, evaluation=[]) + [f"hydra.run.dir={run_dir}"]
    sft = run_dir / "stages" / "1_sft"
    proc = start_run(args, tmp_path, launcher=[sys.executable])
    wait_until(lambda: any((sft / "checkpoints").glob("step_*")), proc, 600, "a checkpoint of the sft stage")
    proc.send_signal(signal.SIGKILL)  # the pipeline alone, as a node failure or `kill -9 PID` would
    proc.wait()
    # its stage gets SIGTERM from the kernel, saves and stops: never left training on its own
    stage_pid, deadline = json.loads((sft / "status.json").read_text())["pid"], time.monotonic() + 120
    while Path(f"/proc/{stage_pid}").exists() and "Z" not in _proc_state(stage_pid):
        assert time.monotonic() < deadline, "the orphaned stage kept running"
        time.sleep(0.2)
    stopped_at = json.loads((sft / "status.json").read_text())
    assert stopped_at["state"] == "stopped" and 0 < stopped_at["step"] < 40

    out = _stdout(run_cli(args, cwd=tmp_path, timeout=900))
    assert "stage 0 (pretrain): finished earlier, skipped" in out
    assert "stage 1 (sft) continues" in out and "train.resume=auto" in out
    steps = [r["step"] for r in read_metrics(sft / "metrics.jsonl")]
    assert steps == list(range(1, 41))  # one uninterrupted record of the stage
    rows = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [(r["state"], r["steps"]) for r in rows] == [("finished", 4), ("finished", 40)]


@pytest.mark.slow  # ~1-2 minutes: a short first stage, then one that fails
def test_a_failing_stage_stops_the_pipeline_with_one_line_naming_it_and_its_error(tmp_path):
    run_dir = tmp_path / "pipe"
    (tmp_path / "torn.jsonl").write_text('{"messages": [{"role": "user", "content": "2+2?"}, {"ro\n')
    broken = [o for o in SFT if not o.startswith("data=")] + ["data=chat", f"data.path={tmp_path / 'torn.jsonl'}"]
    args = pipeline_args(sft=broken, evaluation=[]) + [f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path, timeout=600)
    assert result.returncode == 2, result.stderr[-2000:]
    [line] = [ln for ln in result.stderr.splitlines() if ln.startswith("error: pipeline")]
    assert line.startswith("error: pipeline stage 1 (sft) failed (exit 2): error: ")
    # the stage's own one line; it refused to start and left no folder, so its stderr is the log
    cause = line.split("failed (exit 2): ", 1)[1].split("; its log: ")[0]
    err_log = run_dir / "stages" / "1_sft.stderr.log"
    assert "torn.jsonl" in cause and cause in err_log.read_text() and f"its log: {err_log};" in line
    assert f"hydra.run.dir={run_dir}" in line  # how to continue after fixing it
    rows = json.loads((run_dir / "pipeline.json").read_text())["stages"]
    assert [r["state"] for r in rows] == ["finished", None]
    table = (run_dir / "pipeline.md").read_text().splitlines()
    assert table[2].startswith("| 0 pretrain | 4 |") and table[3].startswith("| 1 sft (not started) |")
