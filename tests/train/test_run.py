"""End to end: a short run writes every output; resume is exact; eval and generate work."""

import json
import math

import pytest
import torch
import yaml

from h64lm.cli import run
from h64lm.runtime.checkpoint import read_extras, read_full_state
from h64lm.train.metrics import read_metrics
from tests.helpers import FAST, run_cli, run_config, text_corpus, wandb_offline_records


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, corpus):
    """One real `python run.py` with W&B offline: the outputs a user sees."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    args = FAST + ["data=text", f"data.path={corpus}", "logger=wandb", "logger.mode=offline",
                   f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, cwd=run_dir.parent)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_run_writes_every_output(cli_run):
    run_dir, _ = cli_run
    for rel in [".hydra/config.yaml", ".hydra/overrides.yaml", ".hydra/hydra.yaml", "metrics.jsonl",
                "training_history.json", "loss.png", "samples.txt", "summary.json",
                "checkpoints/last", "checkpoints/best/manifest.json", "checkpoints/step_0000006/manifest.json",
                "best_model.safetensors"]:
        assert (run_dir / rel).is_file(), rel
    assert (run_dir / "expert_load.png").is_file(), "no expert-load plot"
    overrides = yaml.safe_load((run_dir / ".hydra/overrides.yaml").read_text())
    assert "train.max_steps=6" in overrides
    records = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 7))
    for r in records:
        assert math.isfinite(r["loss"]) and r["tokens_per_s"] > 0 and r["router"]
        assert r["tokens"] == r["step"] * 2 * 32  # pretraining: train.batch_size x data.seq_len per step
    history = json.loads((run_dir / "training_history.json").read_text())
    assert history["step"] == [3, 6] and len(history["val_loss"]) == 2
    assert "## step 6" in (run_dir / "samples.txt").read_text()


def test_wandb_offline_run_holds_the_logged_metrics(cli_run):
    run_dir, _ = cli_run
    records = wandb_offline_records(run_dir)
    logged = read_metrics(run_dir / "metrics.jsonl")
    history = [r["history"]["item"] for r in records if r["type"] == "history"]
    losses = {int(h["_step"]): h["loss"] for h in history if "loss" in h}
    assert losses == pytest.approx({r["step"]: r["loss"] for r in logged})
    val = {int(h["_step"]): h["val_loss"] for h in history if "val_loss" in h}
    assert val == pytest.approx({r["step"]: r["val_loss"] for r in logged if "val_loss" in r})
    assert all(len(h["router.1.load"]) == 4 for h in history if "loss" in h)
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["config"]["update"]["train.max_steps"] == 6
    summary = [r["summary"]["update"] for r in records if r["type"] == "summary"]
    assert any(s.get("best_val_loss") == pytest.approx(min(val.values())) for s in summary)


@pytest.mark.parametrize("optim", [pytest.param([], id="muon"),  # the default optimizer
                                   pytest.param(["optim=adamw"], id="adamw", marks=pytest.mark.slow),
                                   pytest.param(["train.grad_accum=2"], id="muon-accum", marks=pytest.mark.slow)])
def test_resume_from_step_k_is_bit_exact(tmp_path, corpus, optim):
    """The state saved at step 3 continues exactly as the uninterrupted run did (CPU, fp32)."""
    base = FAST + ["data=text", f"data.path={corpus}", "train.keep_last=5"] + optim
    full_dir = tmp_path / "full"
    run(run_config(base), full_dir, base)
    resumed_dir = tmp_path / "resumed"
    resume = base + [f"train.resume={full_dir / 'checkpoints' / 'step_0000003'}"]
    run(run_config(resume), resumed_dir, resume)
    full = {r["step"]: r["loss"] for r in read_metrics(full_dir / "metrics.jsonl")}
    again = {r["step"]: r["loss"] for r in read_metrics(resumed_dir / "metrics.jsonl")}
    assert sorted(again) == [4, 5, 6]
    assert all(again[s] == full[s] for s in again), (again, full)  # bit for bit
    a = read_full_state(full_dir / "checkpoints" / "step_0000006")["model"]
    b = read_full_state(resumed_dir / "checkpoints" / "step_0000006")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_existing_checkpoints_are_never_overwritten_without_resume(tmp_path, corpus):
    base = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=3"]
    run(run_config(base), tmp_path, base)
    before = (tmp_path / "checkpoints" / "step_0000003" / "manifest.json").read_bytes()
    with pytest.raises(ValueError, match="train.resume=auto"):
        run(run_config(base), tmp_path, base)
    assert (tmp_path / "checkpoints" / "step_0000003" / "manifest.json").read_bytes() == before


def test_resume_auto_continues_in_its_directory(tmp_path, corpus):
    base = FAST + ["data=text", f"data.path={corpus}"]
    run(run_config(base + ["train.max_steps=3"]), tmp_path, base)
    more = base + ["train.resume=auto"]
    run(run_config(more), tmp_path, more)
    steps = [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert steps == list(range(1, 7))


def test_resume_compares_the_architecture_not_training_settings(tmp_path, corpus):
    """The rule train.init_from applies too (h64lm/model/architecture.py): a changed balancing
    coefficient continues the run; a changed expert count is refused in one line, nothing lost."""
    base = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=2"]
    run(run_config(base), tmp_path, base)
    before = (tmp_path / "checkpoints" / "step_0000002" / "manifest.json").read_bytes()
    wider = base + ["model.num_experts=8", "train.resume=auto", "train.max_steps=3"]
    with pytest.raises(ValueError, match=r"^cannot resume: .*model\.num_experts \(4 -> 8\)$"):
        run(run_config(wider), tmp_path, wider)
    assert (tmp_path / "checkpoints" / "step_0000002" / "manifest.json").read_bytes() == before
    looser = base + ["model.router_aux_loss_coef=0.05", "train.resume=auto", "train.max_steps=3"]
    run(run_config(looser), tmp_path, looser)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_eval_and_generate_on_a_saved_run(cli_run, corpus, tmp_path, capsys):
    run_dir, _ = cli_run
    own = ["mode=eval", f"checkpoint={run_dir}", "hardware=cpu", "logger=none"]
    loss = run(run_config(own), tmp_path / "eval", own)
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    history = json.loads((run_dir / "training_history.json").read_text())
    assert result["val_loss"] == loss == pytest.approx(history["val_loss"][-1], rel=1e-5)
    assert f"val_loss {loss:.4f}" in capsys.readouterr().out

    whole = ["mode=eval", f"checkpoint={run_dir / 'checkpoints' / 'best'}", "data=text",
             f"data.path={corpus}", "data.seq_len=32", "hardware=cpu", "logger=none"]
    run(run_config(whole), tmp_path / "eval_file", whole)
    file_result = json.loads((tmp_path / "eval_file" / "eval.json").read_text())
    assert file_result["windows"] > result["windows"]  # the whole file, not the val split

    gen = run_cli(["mode=generate", f"checkpoint={run_dir}", "prompt=Deep learning is",
                   "gen.max_new_tokens=8", "hardware=cpu", "logger=none",
                   f"hydra.run.dir={tmp_path / 'gen'}"], cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-2000:]
    text = (tmp_path / "gen" / "generations.txt").read_text()
    assert text.startswith("Deep learning is") and len(text.strip()) > len("Deep learning is")
    assert text.strip() in gen.stdout


def test_bad_config_fails_fast_with_one_line(tmp_path):
    proc = run_cli(["model.num_kv_heads=3", f"hydra.run.dir={tmp_path / 'r'}"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("error: model.num_kv_heads=3"), proc.stderr[-1000:]
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_runs_train_and_lower_the_loss(tmp_path, corpus, precision):
    overrides = FAST + ["data=text", f"data.path={corpus}", f"hardware.precision={precision}",
                        "train.max_steps=4", "train.eval_every=4", "train.save_every=4",
                        "optim.lr=1e-2", "train.sample_tokens=0"]
    run(run_config(overrides), tmp_path, overrides)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(math.isfinite(r["loss"]) for r in records)
    assert records[-1]["loss"] < records[0]["loss"]
    state = read_extras(tmp_path / "checkpoints" / "step_0000004")
    # fp16 trains through a loss scaler whose state is checkpointed; bf16 needs none.
    assert bool(state["scaler"]) == (precision == "fp16")


@pytest.mark.slow  # compiling on 2 CPU cores takes ~40 s
def test_compiled_training_matches_eager(tmp_path, corpus):
    base = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=2", "train.eval_every=2",
                   "train.save_every=2", "train.sample_tokens=0"]
    run(run_config(base), tmp_path / "eager", base)
    compiled = base + ["hardware.compile=true"]
    run(run_config(compiled), tmp_path / "compiled", compiled)
    eager = read_metrics(tmp_path / "eager" / "metrics.jsonl")
    comp = read_metrics(tmp_path / "compiled" / "metrics.jsonl")
    for a, b in zip(eager, comp):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    keys = read_full_state(tmp_path / "compiled" / "checkpoints" / "step_0000002")["model"]
    assert not any("_orig_mod" in k for k in keys)  # checkpoints hold the plain model's names
