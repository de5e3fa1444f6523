"""stage=rl through the trainer: logged terms, validation, exact resume, PPO, a reward model,
the layouts against one process, and the config errors in one line."""

import json
import math
import random
import signal
import sys

import pytest
import torch

from experiments.fault_procs import kill_and_wait, logged_steps, start_run, wait_until
from h64lm.cli import run
from h64lm.runtime.checkpoint import read_full_state
from h64lm.train.metrics import read_metrics
from h64lm.validation import ConfigError
from tests.helpers import FAST, run_cli, run_config

# FAST's tiny model on arithmetic prompts: 2 prompts x 4 completions of <= 8 tokens per step
RL = [a for a in FAST if not a.startswith("data.")] + [
    "stage=rl", "data=arithmetic", "data.seq_len=96", "data.max_samples=200", "train.sample_tokens=0",
    "train.max_steps=4", "train.eval_every=2", "train.save_every=2", "train.keep_last=5",
    "stage.group_size=4", "stage.max_new_tokens=8", "stage.eval_examples=4", "stage.eval_max_new_tokens=8"]
LOGGED = ("reward/mean", "reward/std", "kl", "clip_fraction", "completion_length", "samples_per_s", "pg_loss")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


@pytest.fixture(scope="module")
def rl_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("rl") / "full"
    run(run_config(RL), run_dir, RL)
    return run_dir


def test_rl_run_logs_its_terms_and_validates_by_exact_match(rl_run):
    records = read_metrics(rl_run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for r in records:
        assert all(math.isfinite(r[k]) for k in LOGGED), r
        assert 1 <= r["completion_length"] <= 8 and r["samples_per_s"] > 0
    assert records[0]["kl"] == 0.0  # the policy is its reference before the first update
    assert records[-1]["kl"] > 0.0  # and moves away from it
    assert all(r["clip_fraction"] == 0.0 for r in records)  # mu = 1: the ratio is 1
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["val_loss"] == 1.0 - r["rl/exact_match"] and 0 <= r["rl/reward"] <= 1.1
        assert "sft/exact_match" in r  # the test problems, comparable with the SFT run's table
        assert all("top1_changed_from_start" in layer for layer in r["routing"].values())


def test_rl_resume_from_step_k_is_bit_exact(rl_run, tmp_path):
    """The prompt position, the sampling seeds and the optimizer continue exactly (CPU, fp32)."""
    resume = RL + [f"train.resume={rl_run / 'checkpoints' / 'step_0000002'}"]
    run(run_config(resume), tmp_path, resume)
    keys = ("loss", "reward/mean", "kl", "completion_length", "grad_norm", "val_loss")
    full = {r["step"]: [r.get(k) for k in keys] for r in read_metrics(rl_run / "metrics.jsonl")}
    again = {r["step"]: [r.get(k) for k in keys] for r in read_metrics(tmp_path / "metrics.jsonl")}
    assert sorted(again) == [3, 4]
    assert all(again[s] == full[s] for s in again), (again, full)
    a = read_full_state(rl_run / "checkpoints" / "step_0000004")["model"]
    b = read_full_state(tmp_path / "checkpoints" / "step_0000004")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_rl_tokens_count_prompt_and_completion_positions_of_every_rollout_row(tmp_path):
    """`tokens` grows by the positions the policy's training forward reads: for each of the G
    rows of each prompt, the prompt without its left padding and the completion through its
    first </s> (the last sampled column is no input), over both micro-batches."""
    from tests.helpers import fit_recording_batches

    G, eos = 4, 2  # stage.group_size; Mistral's </s>
    args = RL + ["train.max_steps=2", "train.grad_accum=2", "stage.eval_examples=2"]
    records, steps = fit_recording_batches(args, tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    previous, padded = 0, 0
    for record, (prompts, rollouts) in zip(records, steps):
        hand = 0
        for p, r in zip(prompts, rollouts):
            L = p.input_ids.shape[1]
            assert r.input_ids.shape[0] == G * p.input_ids.shape[0]
            for row in range(r.input_ids.shape[0]):
                completion = r.input_ids[row, L:].tolist()
                through_eos = completion[:completion.index(eos) + 1] if eos in completion else completion
                hand += int(p.extras["attention_mask"][row // G].sum()) + len(through_eos)
            padded += r.input_ids.numel()
        assert record["tokens"] - previous == hand
        previous = record["tokens"]
    assert previous < padded  # left padding or post-</s> columns occurred: a count of shapes would differ


@pytest.mark.slow
def test_rl_sigkill_then_resume_auto_matches_uninterrupted_run(rl_run, tmp_path):
    run_dir = tmp_path / "run"
    args = RL + ["train.max_steps=4", "train.save_every=1", f"hydra.run.dir={run_dir}"]
    proc = start_run(args, tmp_path, env={"H64LM_FAULT_STEP_DELAY": "0.5"})
    kill_step = random.Random(3).randint(2, 3)
    wait_until(lambda: logged_steps(run_dir) >= kill_step, proc, timeout=300, what=f"step {kill_step}")
    kill_and_wait(proc, signal.SIGKILL, timeout=30)
    done = run_cli(args + ["train.resume=auto"], cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    a = read_full_state(rl_run / "checkpoints" / "step_0000004")["model"]
    b = read_full_state(run_dir / "checkpoints" / "step_0000004")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def ppo_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ppo") / "full"
    args = RL + ["stage.algorithm=ppo", "model.score_head=true", "train.max_steps=2"]
    run(run_config(args), run_dir, args)
    return run_dir


def test_ppo_logs_value_loss_and_values(ppo_run):
    records = read_metrics(ppo_run / "metrics.jsonl")
    for r in records:
        assert math.isfinite(r["value_loss"]) and r["value_loss"] > 0 and math.isfinite(r["value/mean"])
        assert all(math.isfinite(r[k]) for k in LOGGED)
    assert records[0]["kl"] == 0.0


def test_a_reward_model_run_scores_the_completions(ppo_run, tmp_path):
    """The PPO run's model has a score head: as stage.reward_model its scores are the rewards,
    real numbers rather than the verifiable rewards' 0 / 0.1 / 1.1."""
    from h64lm.data.batch import Batch
    from h64lm.data.chat import ChatFormat, Message
    from h64lm.objectives.rollout import sample_rollout
    from h64lm.train.rl_stage import _model_reward, load_reward_model

    model = load_reward_model(str(ppo_run), torch.device("cpu"))
    question = "Mia has 2 pens. She gets 3 more. How many pens does Mia have now?"
    ids = torch.tensor([ChatFormat().prompt([Message("user", question)])])
    prompts = Batch(ids, torch.full_like(ids, -100), extras={"attention_mask": torch.ones_like(ids),
                                                             "position": torch.tensor([0])})
    rollout = sample_rollout(model, prompts, 3, 6, 1.0, eos_id=2, seed=1)
    rewards = _model_reward(model)(rollout, prompts)
    with torch.no_grad():
        scores = model(rollout.sequences, attention_mask=rollout.attention).scores
    for row in range(3):
        last = ids.shape[1] + int(rollout.mask[row].sum()) - 1  # the EOS, or the last sampled token
        assert rewards[row].item() == scores[row, last].item()
    args = RL + [f"stage.reward_model={ppo_run}", "train.max_steps=1"]
    run(run_config(args), tmp_path, args)
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert math.isfinite(record["reward/mean"]) and record["reward/mean"] not in (0.0, 0.1, 1.1)


def test_config_errors_are_one_line(rl_run, tmp_path):
    from h64lm.train.loop import Trainer
    from tests.train.test_stage import ONE

    with pytest.raises(ConfigError, match=r"^stage.group_size=1 with stage.advantage_scale=std: .*raise stage.grou"):
        run_config(RL + ["stage.group_size=1"])
    with pytest.raises(ConfigError, match=r"^stage=rl needs prompts with reference answers .*not data=wiki_excerpt"):
        run_config([a for a in RL if not a.startswith("data")])
    with pytest.raises(ConfigError, match=r"^stage.algorithm=ppo needs a value head: set model.score_head=true"):
        run_config(RL + ["stage.algorithm=ppo"])
    with pytest.raises(ConfigError, match=r"^stage.algorithm=grpo trains no value head: set model.score_head=false"):
        run_config(RL + ["model.score_head=true"])
    for override, message in (
            ("stage.whiten_advantages=true", r"^stage.whiten_advantages=true with stage.algorithm=grpo: GRPO's adv"),
            ("stage.top_p=0", r"^stage.top_p=0.0 must be > 0 and <= 1"),
            ("stage.top_k=-1", r"^stage.top_k=-1 must be >= 0"),
            ("stage.rpo_alpha=0.5", r"^stage.rpo_alpha=0.5 is a DPO option")):
        with pytest.raises(ConfigError, match=message):
            run_config(RL + [override])
    assert run_config(RL + ["stage.whiten_advantages=false"]).stage.whiten_advantages is False
    args = RL + [f"stage.reward_model={rl_run}"]
    with pytest.raises(ConfigError, match=r"^stage.reward_model=.*has no score head"):
        Trainer(run_config(args), tmp_path, args, ONE, callbacks=[])
    assert not (tmp_path / "checkpoints").exists()
    args = RL + ["stage.max_new_tokens=5000"]
    with pytest.raises(ConfigError, match=r"^the longest prompt \(\d+ tokens\) \+ stage.max_new_tokens .* gives"):
        Trainer(run_config(args), tmp_path, args, ONE, callbacks=[])
    # GSM8K-style local files are prompt sources when their answers end with `#### N`
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"It is {i + 1}."})
                              for i in range(20)))
    args = [a for a in RL if not a.startswith("data=")] + ["data=chat", f"data.path={rows}", "data.val_fraction=0.2"]
    with pytest.raises(ConfigError, match=r"^data=chat: no training conversation ends with a `#### answer` line"):
        Trainer(run_config(args), tmp_path, args, ONE, callbacks=[])


def test_gsm8k_style_rows_become_prompts_with_their_final_answers():
    from h64lm.data.chat import ChatFormat, Message
    from h64lm.train.rl_stage import prompts_with_answers

    chat = ChatFormat()
    convs = [[Message("user", "What is 2 + 3?"), Message("assistant", "2 + 3 = 5.\n#### 5")],
             [Message("user", "Hi"), Message("assistant", "Hello!")],  # no answer line: left out
             [Message("system", "Be brief."), Message("user", "And 1,000 + 1?"), Message("assistant", "#### 1,001")]]
    prompts = prompts_with_answers(convs, chat)
    assert [p.reference for p in prompts] == ["5", "1,001"]
    assert list(prompts[0].ids) == chat.prompt(convs[0][:1])
    assert list(prompts[1].ids) == chat.prompt(convs[2][:2])


def _assert_same_steps(one, two, tolerance):
    assert [r["step"] for r in two] == [r["step"] for r in one]
    for a, b in zip(one, two):
        # sampled identically by construction: the rewards, lengths and token counts are equal, not close
        assert (a["reward/mean"], a["completion_length"], a["tokens"]) == \
            (b["reward/mean"], b["completion_length"], b["tokens"])
        for key in ("loss", "grad_norm", "kl"):
            assert b[key] == pytest.approx(a[key], **tolerance), (a["step"], key)


def _one_and_two(tmp_path, extra_two, extra=()):
    common = RL + ["train.max_steps=3", "model.router_aux_loss_coef=0", "stage.eval_examples=0",
                   "train.eval_every=3", "hardware.device=cpu", "hardware.precision=fp32", *extra]
    one = run_cli(common + ["train.batch_size=1", "train.grad_accum=2", f"hydra.run.dir={tmp_path / 'one'}"],
                  cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = run_cli(common + ["train.batch_size=1", *extra_two, f"hydra.run.dir={tmp_path / 'two'}"],
                  cwd=tmp_path, launcher=TORCHRUN)
    assert two.returncode == 0, two.stderr[-3000:]
    return read_metrics(tmp_path / "one" / "metrics.jsonl"), read_metrics(tmp_path / "two" / "metrics.jsonl")


@pytest.mark.parametrize("extra", [[], ["stage.algorithm=ppo", "model.score_head=true", "stage.top_k=20",
                                         "stage.top_p=0.9"]], ids=["grpo", "ppo-whitened-top-k-top-p"])
def test_two_process_rl_matches_one_process(tmp_path, extra):
    """Two DDP ranks with one prompt micro-batch each sample what one process samples from the
    same two micro-batches (the seed follows the prompts' global position, not the rank). PPO
    whitens its advantages (the default) with statistics of both ranks' tokens, as one process
    does over its two micro-batches; truncated sampling keeps the per-position streams."""
    one, two = _one_and_two(tmp_path, ["hardware=ddp"], extra)
    _assert_same_steps(one, two, dict(rel=1e-5, abs=1e-7))
    assert two[-1]["val_loss"] == one[-1]["val_loss"]
    if extra:
        for a, b in zip(one, two):
            assert b["value_loss"] == pytest.approx(a["value_loss"], rel=1e-5, abs=1e-7)


@pytest.mark.slow
@pytest.mark.parametrize("layout", [["hardware=fsdp"], ["hardware=ddp", "hardware.ep=2"]], ids=["fsdp", "ep"])
def test_sharded_rl_matches_one_process(tmp_path, layout):
    """Under sharded weights every rank decodes max_new_tokens steps (each forward a collective);
    the rollouts are the same as one process's early-stopped ones."""
    one, two = _one_and_two(tmp_path, layout)
    _assert_same_steps(one, two, dict(rel=1e-5, abs=1e-7))


def test_a_frozen_router_stays_while_the_rest_trains(tmp_path):
    """train.freeze=[router] in the RL stage: the routers keep the starting weights, which the
    frozen reference routes with too."""
    from h64lm.train.loop import Trainer
    from tests.train.test_stage import ONE

    args = RL + ["train.freeze=[router]", "train.max_steps=2", "stage.eval_examples=0"]
    trainer = Trainer(run_config(args), tmp_path, args, ONE, callbacks=[])
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    for _ in range(2):
        trainer.train_step(stop_requested=False)
    after = trainer.model.state_dict()
    routers = [k for k in start if "router" in k]
    assert routers and all(torch.equal(start[k], after[k]) for k in routers)
    assert not torch.equal(start["lm_head.weight"], after["lm_head.weight"])
    reference = trainer.objective.reference.state_dict()
    assert all(torch.equal(start[k], reference[k]) for k in start)  # the reference never moves
