"""stage=reward and stage=dpo through the trainer: DPO's first step against its own start (ln 2,
zero margins), the precomputed reference equal to the frozen model, exact resume, the reward model
learning, two processes equal to one, and the config rules."""

import math

import pytest
import torch
from safetensors.torch import load_file

from h64lm.cli import run
from h64lm.runtime.checkpoint import read_full_state
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import FAST, compose_cfg, run_config

# FAST's tiny model; 96-token rows hold one arithmetic conversation (~70 tokens)
PAIRS = [a for a in FAST if not a.startswith("data.")] + [
    "data=preference_arithmetic", "data.seq_len=96", "data.max_samples=48", "train.sample_tokens=0",
    "train.keep_last=5", "train.eval_every=3", "stage.eval_examples=0"]
DPO = PAIRS + ["stage=dpo"]
REWARD = PAIRS + ["stage=reward"]
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected")


def _steps(run_dir, keys=("loss", "val_loss")):
    return {r["step"]: tuple(r.get(k) for k in keys) for r in read_metrics(run_dir / "metrics.jsonl")}


@pytest.fixture(scope="module")
def dpo_runs(tmp_path_factory):
    """The same 6 DPO steps with the reference run at every step and precomputed at the start."""
    root = tmp_path_factory.mktemp("dpo")
    for name, extra in (("live", []), ("pre", ["stage.precompute_reference=true"])):
        args = DPO + extra
        run(run_config(args), root / name, args)
    return root


def test_dpo_first_step_is_ln2_with_zero_margins(dpo_runs):
    """Policy == reference at step 0 (both the same seeded start): every implicit reward is 0, so
    the sigmoid loss is exactly ln 2 and accuracy 0 (no pair's chosen reward is strictly higher)."""
    for name in ("live", "pre"):
        first = read_metrics(dpo_runs / name / "metrics.jsonl")[0]
        assert first["pair_loss"] == pytest.approx(math.log(2), abs=1e-6)
        assert first["rewards/chosen"] == first["rewards/rejected"] == first["rewards/margins"] == 0.0
        assert first["rewards/accuracies"] == 0.0
        assert first["logps/chosen"] < 0 and first["logps/rejected"] < 0
    later = read_metrics(dpo_runs / "live" / "metrics.jsonl")[-1]
    assert later["rewards/margins"] != 0.0  # the check can tell a moved policy apart
    assert all(f"val/{m}" in later for m in METRICS) and math.isfinite(later["val_loss"])


def test_precomputed_reference_equals_the_frozen_model_step_for_step(dpo_runs):
    live = read_metrics(dpo_runs / "live" / "metrics.jsonl")
    pre = read_metrics(dpo_runs / "pre" / "metrics.jsonl")
    assert [r["step"] for r in pre] == list(range(1, 7))
    for a, b in zip(live, pre):
        for key in ("loss", "pair_loss", "grad_norm") + METRICS:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
        if "val_loss" in a:
            for key in ("val_loss",) + tuple(f"val/{m}" for m in METRICS):
                assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (a["step"], key)
    assert (dpo_runs / "pre" / "reference_logps.safetensors").is_file()
    assert not (dpo_runs / "live" / "reference_logps.safetensors").exists()


@pytest.fixture(scope="module")
def reward_run(tmp_path_factory):
    """6 uninterrupted reward-model steps (evaluations at 3 and 6)."""
    run_dir = tmp_path_factory.mktemp("reward") / "full"
    run(run_config(REWARD), run_dir, REWARD)
    return run_dir


def _uninterrupted(stage, request):
    """The 6-step run of `stage` that a resumed one must equal: DPO's with the precomputed
    reference, or the reward model's."""
    return request.getfixturevalue("dpo_runs") / "pre" if stage == "dpo" else request.getfixturevalue("reward_run")


STAGE_ARGS = {"dpo": DPO + ["stage.precompute_reference=true"], "reward": REWARD}


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_preference_stage_resumes_bit_exact(stage, request, tmp_path):
    """Stop at step 3, resume: the pair loader, the RNG, the optimizer and (DPO) the saved
    reference log-probs continue exactly (CPU, fp32)."""
    args, full = STAGE_ARGS[stage], _uninterrupted(stage, request)
    resumed = tmp_path / "resumed"
    if stage == "dpo":  # the reference file travels with the run directory
        resumed.mkdir()
        (resumed / "reference_logps.safetensors").write_bytes((full / "reference_logps.safetensors").read_bytes())
    again = args + [f"train.resume={full / 'checkpoints' / 'step_0000003'}"]
    run(run_config(again), resumed, again)
    a, b = _steps(full), _steps(resumed)
    assert sorted(b) == [4, 5, 6] and all(b[s] == a[s] for s in b), (a, b)  # bit for bit
    x = read_full_state(full / "checkpoints" / "step_0000006")["model"]
    y = read_full_state(resumed / "checkpoints" / "step_0000006")["model"]
    assert all(torch.equal(x[k], y[k]) for k in x)


def test_a_damaged_reference_file_is_computed_again_on_resume(dpo_runs, tmp_path):
    """The precomputed reference log-probs are derivable: an unreadable file is rebuilt from the
    starting weights, and the resumed steps equal the uninterrupted run's."""
    full, resumed = dpo_runs / "pre", tmp_path / "resumed"
    resumed.mkdir()
    (resumed / "reference_logps.safetensors").write_bytes(b"not a safetensors file")
    again = DPO + ["stage.precompute_reference=true", f"train.resume={full / 'checkpoints' / 'step_0000003'}"]
    run(run_config(again), resumed, again)
    a, b = _steps(full), _steps(resumed)
    assert sorted(b) == [4, 5, 6]
    for step in b:
        for x, y in zip(a[step], b[step]):
            assert (x is None) == (y is None) and (x is None or y == pytest.approx(x, rel=1e-5, abs=1e-6)), step
    rebuilt = load_file(resumed / "reference_logps.safetensors")  # written again, whole
    original = load_file(full / "reference_logps.safetensors")
    assert all(torch.allclose(rebuilt[k], original[k], rtol=1e-5, atol=1e-5) for k in ("train", "val"))


def test_dpo_tokens_count_the_real_positions_of_both_rows_of_every_pair(tmp_path):
    """`tokens` grows by each step's input positions up to each row's </s>: chosen and rejected
    rows of every pair, over both micro-batches; the padding after the </s> is left out."""
    from h64lm.data.preference_batches import PAD_ID
    from tests.helpers import fit_recording_batches

    args = DPO + ["train.max_steps=2", "train.grad_accum=2", "train.eval_every=2"]
    records, steps = fit_recording_batches(args, tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    previous = 0
    for record, (_, trained) in zip(records, steps):
        assert [b.input_ids.shape[0] for b in trained] == [4, 4]  # 2 pairs -> 2 rows each, 2 micro-batches
        hand = sum(int((b.input_ids != PAD_ID).sum()) for b in trained)  # <unk> is never a real token here
        assert hand < sum(b.input_ids.numel() for b in trained)  # padded rows: a count of shapes would differ
        assert record["tokens"] - previous == hand
        assert record["tokens_per_s"] == pytest.approx(hand / record["step_time_s"])
        previous = record["tokens"]


def test_reward_model_learns_a_held_out_preference(tmp_path):
    """A few dozen Bradley-Terry steps on pairs whose chosen answer differs from the rejected one by
    a learnable cue lift held-out pairwise accuracy from chance to near 1."""
    import json

    rows = [{"prompt": f"Question {i}: is {i} a number?",
             "chosen": f"Yes, {i} is a number. Thank you.", "rejected": f"No. {i} is not."} for i in range(200)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [a for a in REWARD if not a.startswith("data.")] + [
        "data.name=preference", f"data.path={path}", "data.seq_len=48", "data.val_fraction=0.2",
        "train.max_steps=30", "train.eval_every=30", "train.batch_size=4", "optim=adamw", "optim.lr=3e-3",
        "optim.warmup_steps=3"]
    run(run_config(args), tmp_path / "run", args)
    last = read_metrics(tmp_path / "run" / "metrics.jsonl")[-1]
    assert last["val/rewards/accuracies"] >= 0.9
    assert last["val_loss"] < math.log(2)


def test_two_process_dpo_matches_one_process(tmp_path):
    """Two gloo ranks with one pair each equal one process with two: the loss is the mean over
    the step's pairs on every rank, the reference runs in each rank's layout. With RPO's NLL term
    (stage.rpo_alpha) on: its per-token mean over the step's chosen answers (of unequal lengths
    on the two ranks) counts the tokens of both ranks."""
    from tests.helpers import one_and_two_processes

    common = DPO + ["train.max_steps=3", "model.router_aux_loss_coef=0", "stage.rpo_alpha=0.5"]
    one, two = one_and_two_processes(common, tmp_path)
    assert [r["step"] for r in two] == [1, 2, 3]
    assert [r["tokens"] for r in two] == [r["tokens"] for r in one]  # every rank's rows counted once
    for r in one:  # the logged terms add up: DPO + alpha NLL (+ the z-loss, the only router term left)
        assert r["loss"] == pytest.approx(r["pair_loss"] + 0.5 * r["nll_loss"] + r.get("z", 0.0) *
                                          run_config(common).model.router_z_loss_coef, rel=1e-5)
    assert one[-1]["val_loss"] == pytest.approx(one[-1]["val/pair_loss"] + 0.5 * one[-1]["val/nll_loss"], rel=1e-6)
    for a, b in zip(one, two):
        for key in ("loss", "logps/chosen", "nll_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), key
        # a margin is beta x a difference of ~-300-nat log-probs: fp32 rounding of those (~3e-5)
        # times beta = 0.1 bounds it, whatever its own size
        assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4)
    assert two[-1]["val_loss"] == pytest.approx(one[-1]["val_loss"], rel=1e-5)
    assert two[-1]["val/nll_loss"] == pytest.approx(one[-1]["val/nll_loss"], rel=1e-5)
    assert two[-1]["val/rewards/accuracies"] == one[-1]["val/rewards/accuracies"]


@pytest.mark.parametrize("overrides, message", [
    (["stage=dpo", "data=preference_arithmetic", "stage.rpo_alpha=-0.1"], r"^stage\.rpo_alpha=-0\.1 must be >= 0"),
    (["stage=reward", "data=preference_arithmetic", "stage.rpo_alpha=1"],
     r"^stage\.rpo_alpha=1(\.0)? is a DPO option .*stage=reward has no use for it"),
    (["stage=dpo", "data=arithmetic"], r"^stage=dpo trains on preference pairs .*not data=arithmetic"),
    (["stage=reward"], r"^stage=reward trains on preference pairs .*not data=wiki_excerpt"),
    (["stage.name=reward", "data=preference_arithmetic"], r"^stage=reward trains the scalar head: set model\.score_head=true"),
    (["stage=dpo", "data=preference_arithmetic", "stage.loss_type=ipo", "stage.label_smoothing=0.1"],
     r"^stage\.label_smoothing=0\.1 applies to stage\.loss_type=sigmoid only"),
    (["stage=dpo", "data=preference_arithmetic", "stage.beta=0"], r"stage\.beta"),
    (["stage=dpo", "data=preference_arithmetic", "stage.loss_type=hinge"], r"stage\.loss_type"),
])
def test_stage_and_data_must_agree(overrides, message):
    with pytest.raises(ConfigError, match=message):
        run_config(overrides)


def test_preset_sets_the_score_head_and_loss_names_match_the_objectives():
    from h64lm.config import DPO_LOSSES
    from h64lm.objectives.preference import DPO_LOSSES as OBJECTIVE_LOSSES

    assert run_config(["stage=reward", "data=preference_arithmetic"]).model.score_head is True
    assert run_config(["stage=dpo", "data=preference_arithmetic"]).model.score_head is False
    assert DPO_LOSSES == OBJECTIVE_LOSSES
    with pytest.raises(Exception, match="betta"):
        compose_cfg(["stage=dpo", "stage.betta=0.1"])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_fsdp_and_expert_parallel_match_one_process(stage, tmp_path):
    """FSDP2 and expert parallelism (2 gloo processes, one pair each) train and validate like one
    process with both pairs; DPO's frozen reference is sharded like the policy, its forwards
    collectives; DPO runs with RPO's NLL term, whose token count spans the ranks. Tolerances as
    the DDP test's (fp32 sums in another order)."""
    import sys

    from tests.helpers import run_cli

    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    common = (DPO + ["stage.rpo_alpha=0.5"] if stage == "dpo" else REWARD) + ["train.max_steps=3",
                                                                              "model.router_aux_loss_coef=0"]
    runs = {}
    for name, extra, launcher in (
            ("one", ["train.batch_size=2"], None),
            ("fsdp", ["train.batch_size=1", "hardware=fsdp", "hardware.device=cpu"], torchrun),
            ("ep", ["train.batch_size=1", "hardware=fsdp", "hardware.device=cpu", "hardware.strategy=ddp",
                    "hardware.ep=2"], torchrun)):
        done = run_cli(common + extra + [f"hydra.run.dir={tmp_path / name}"], cwd=tmp_path, launcher=launcher)
        assert done.returncode == 0, done.stderr[-3000:]
        runs[name] = read_metrics(tmp_path / name / "metrics.jsonl")
    for name in ("fsdp", "ep"):
        assert [r["step"] for r in runs[name]] == [1, 2, 3]
        for a, b in zip(runs["one"], runs[name]):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), (name, a["step"])
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a["step"])
            assert b["rewards/margins"] == pytest.approx(a["rewards/margins"], abs=1e-5), (name, a["step"])
        assert runs[name][-1]["val_loss"] == pytest.approx(runs["one"][-1]["val_loss"], rel=1e-5)
        assert runs[name][-1]["val/rewards/accuracies"] == runs["one"][-1]["val/rewards/accuracies"]


@pytest.mark.slow  # a killed subprocess run and its resume: 35 s (reward), 100 s (dpo, its two runs) on 2 shared cores
@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_sigkill_then_resume_auto_matches_the_uninterrupted_run(stage, request, tmp_path, capsys):
    """SIGKILL between steps: train.resume=auto continues from the last save (DPO reads
    RUN/reference_logps.safetensors) and ends with every logged number of every step and the
    weights of the uninterrupted run."""
    import signal

    from experiments.fault_procs import ResumeLog, final_weights, kill_and_wait, logged_steps, start_run, wait_until
    from tests.train.test_stage_parallel import numbers_by_step

    args, reference = STAGE_ARGS[stage] + ["train.save_every=2"], _uninterrupted(stage, request)
    run_dir = tmp_path / "run"
    proc = start_run(args + [f"hydra.run.dir={run_dir}"], tmp_path, env={"H64LM_FAULT_STEP_DELAY": "0.3"})
    wait_until(lambda: logged_steps(run_dir) >= 3, proc, timeout=300, what="step 3")
    code, _ = kill_and_wait(proc, signal.SIGKILL, timeout=30)
    assert code == -signal.SIGKILL and logged_steps(run_dir) < 6  # killed before the end
    if stage == "dpo":
        assert (run_dir / "reference_logps.safetensors").is_file()
    saved = int((run_dir / "checkpoints" / "last").read_text().strip().removeprefix("step_"))
    again = args + ["train.resume=auto"]
    capsys.readouterr()
    run(run_config(again), run_dir, again)
    assert ResumeLog(capsys.readouterr().out).step == saved >= 2  # resumed, not trained again from scratch
    got, expected = numbers_by_step(run_dir), numbers_by_step(reference)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    assert all(got[s] == expected[s] for s in expected), \
        [(s, k) for s in expected for k in expected[s] if got[s].get(k) != expected[s][k]]  # bit for bit
    a, b = final_weights(run_dir), final_weights(reference)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.parametrize("stage", ["dpo", "reward"])
def test_frozen_router_and_aux_free_bias_in_preference_stages(stage, tmp_path):
    """train.freeze=[router] keeps every router matrix at its start while the rest trains, and the
    aux-free selection bias moves with the policy's loads (model.router_bias_update_rate), in both
    stages."""
    from h64lm.runtime.distributed import Dist
    from h64lm.train.loop import Trainer

    args = (DPO if stage == "dpo" else REWARD) + ["train.freeze=[router]", "model.router_bias_update_rate=0.05",
                                                  "model.router_aux_loss_coef=0"]
    trainer = Trainer(run_config(args), tmp_path, args, Dist(0, 1, torch.device("cpu")), callbacks=[])
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(3):
        stats = trainer.train_step(stop_requested=False)
        assert math.isfinite(stats.loss)
    now = trainer.model.state_dict()
    routers = [k for k in start if k.endswith("router.weight")]
    biases = [k for k in start if k.endswith("router.bias")]
    assert routers and biases
    assert all(torch.equal(now[k], start[k]) for k in routers)
    assert any(not torch.equal(now[k], start[k]) for k in biases)
    assert not torch.equal(now["layers.0.attn.qkv_proj.weight"], start["layers.0.attn.qkv_proj.weight"])
