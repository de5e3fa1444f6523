"""MoE research switches through the real trainer: global-batch balancing, aux-loss-free bias,
routing snapshots, upcycling with train.init_from, export and downstream tasks."""

import json

import pytest
import torch

from h64lm.cli import run
from h64lm.runtime.checkpoint import read_full_state, resolve
from h64lm.train.metrics import read_metrics
from tests.helpers import FAST, run_config, text_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return text_corpus(tmp_path_factory.mktemp("corpus"))


def _train(run_dir, corpus, extra):
    args = FAST + ["data=text", f"data.path={corpus}"] + extra
    run(run_config(args), run_dir, args)
    return read_metrics(run_dir / "metrics.jsonl")


def test_global_scope_is_the_same_step_in_one_or_two_micro_batches(tmp_path, corpus):
    """The Switch loss from the whole step's counts: 1 micro-batch of 4 == 2 micro-batches of 2."""
    common = ["model.router_aux_loss_scope=global", "model.router_aux_loss_coef=0.1", "train.max_steps=3"]
    one = _train(tmp_path / "one", corpus, common + ["train.batch_size=4"])
    two = _train(tmp_path / "two", corpus, common + ["train.batch_size=2", "train.grad_accum=2"])
    for a, b in zip(one, two):
        assert a["aux"] == pytest.approx(b["aux"], abs=1e-5) and a["loss"] == pytest.approx(b["loss"], abs=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    micro = _train(tmp_path / "micro", corpus, common[1:] + ["train.batch_size=2", "train.grad_accum=2"])
    assert micro[0]["aux"] != pytest.approx(two[0]["aux"], abs=1e-6)  # the micro-batch scope differs


def test_bias_updates_and_routing_snapshots_reach_the_metrics(tmp_path, corpus):
    records = _train(tmp_path, corpus, ["model.router_bias_update_rate=0.01", "train.max_steps=4",
                                        "train.eval_every=2"])
    evals = [r for r in records if "routing" in r]
    assert [r["step"] for r in evals] == [2, 4]
    layer = evals[-1]["routing"]["1"]
    # b += rate * sign(mean load - load_i) after every step, recomputed from the logged loads; the
    # loads are shares summing to 1, so their mean is exactly 1/E (the logged shares are rounded:
    # their own mean is not, and an expert at exactly the mean would get a sign from the rounding)
    loads = torch.tensor([r["router"]["1"]["load"] for r in records], dtype=torch.float64)  # [steps, E]
    expected = 0.01 * torch.sign(1 / loads.shape[1] - loads).sum(0)
    assert torch.allclose(torch.tensor(layer["bias"], dtype=torch.float64), expected, atol=1e-6)
    assert 0 <= layer["top1_changed"] <= 1 and layer["load_max_over_mean"] >= 1
    assert "top1_changed" not in evals[0]["routing"]["1"]  # nothing to compare with at the first
    state = read_full_state(resolve(tmp_path))["model"]
    assert torch.allclose(state["layers.1.ffn.router.bias"], torch.tensor(layer["bias"]))
    assert (tmp_path / "expert_load.png").is_file()


def test_upcycled_run_starts_at_the_dense_loss(tmp_path, corpus):
    dense = ["model.moe_layers=none", "model.intermediate_size=32", "train.max_steps=3"]
    _train(tmp_path / "dense", corpus, dense)
    dense_eval = json.loads((tmp_path / "dense" / "training_history.json").read_text())["val_loss"][-1]
    moe = ["model.moe_layers=all", "model.intermediate_size=32", "model.moe_intermediate_size=32",
           "model.router_aux_loss_coef=0", "model.router_z_loss_coef=0", f"train.init_from={tmp_path / 'dense'}",
           "train.max_steps=1", "optim.lr=1e-12", "optim.muon_lr=1e-12", "optim.warmup_steps=0"]
    _train(tmp_path / "moe", corpus, moe)
    upcycled = json.loads((tmp_path / "moe" / "training_history.json").read_text())["val_loss"][0]
    assert upcycled == pytest.approx(dense_eval, abs=1e-5)


def test_init_from_a_different_moe_model_is_refused_in_one_line(tmp_path, corpus):
    _train(tmp_path / "a", corpus, ["train.max_steps=1"])
    args = FAST + ["data=text", f"data.path={corpus}", "model.num_experts=8", f"train.init_from={tmp_path / 'a'}"]
    with pytest.raises(ValueError, match=r"train.init_from=.*model.num_experts \(4 -> 8\)"):
        run(run_config(args), tmp_path / "b", args)


def test_export_then_eval_with_local_harness_tasks(tmp_path, corpus):
    from transformers import AutoModelForCausalLM

    from h64lm.runtime.checkpoint import load_trained_model

    _train(tmp_path / "r", corpus, ["train.max_steps=2"])
    export = ["mode=export", f"checkpoint={tmp_path / 'r'}", f"out={tmp_path / 'hf'}"]
    run(run_config(export), tmp_path / "exp", export)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", trust_remote_code=True, local_files_only=True)
    ours, _ = load_trained_model(tmp_path / "r", torch.device("cpu"))
    ids = torch.randint(0, 32000, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf.eval()(ids).logits, ours(ids).logits, atol=1e-4)

    ev = ["mode=eval", f"checkpoint={tmp_path / 'r'}", "eval.tasks=[h64lm_cloze]", "eval.limit=10",
          "eval.local_examples=10"]
    run(run_config(ev), tmp_path / "ev", ev)
    result = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert 0 <= result["tasks"]["h64lm_cloze"]["acc"] <= 1
    assert (tmp_path / "ev" / "harness" / "results.json").is_file()
