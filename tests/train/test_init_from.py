"""train.init_from through the real trainer: the project's own Hugging Face export of the default
model is accepted with or without the model keys on the command line, training-time settings may
differ, an architecture that conflicts fails in one line, and a damaged folder fails in one line
naming the file."""

import pytest
import torch

from h64lm.cli import run
from h64lm.hf import load_hf_model
from h64lm.runtime.checkpoint import load_trained_model
from h64lm.train.init_from import model_keys_set
from tests.helpers import FAST, run_config, text_corpus

DATA_AND_TRAIN = [o for o in FAST if not o.startswith("model")]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 2-step run of the default model=tiny layout (alternate MoE layers), exported with mode=export."""
    root = tmp_path_factory.mktemp("init_from")
    corpus = text_corpus(root)
    args = FAST + ["data=text", f"data.path={corpus}", "train.max_steps=2"]
    run(run_config(args), root / "run", args)
    export = ["mode=export", f"checkpoint={root / 'run'}", f"out={root / 'hf'}"]
    run(run_config(export), root / "exp", export)
    return root, corpus


def _init_run(root, corpus, name, extra):
    args = DATA_AND_TRAIN + ["data=text", f"data.path={corpus}", f"train.init_from=hf:{root / 'hf'}",
                             "train.max_steps=1", "train.eval_every=1", "optim.lr=1e-12", "optim.muon_lr=1e-12",
                             "optim.warmup_steps=0"] + extra
    cfg = run_config(args)
    run(cfg, root / name, args)
    return root / name


@pytest.mark.parametrize("model_keys", [
    [],  # no model keys: the folder's architecture, as from_pretrained
    [o for o in FAST if o.startswith("model")],  # the same model, written as the run wrote it
    [o for o in FAST if o.startswith("model.")] + ["model.moe_layers=[1]", "model.router_aux_loss_coef=0.5",
                                                    "model.capacity_factor=1.5", "model.dropout=0.1"],
], ids=["folder", "same_keys", "training_settings_differ"])
def test_own_export_initialises_a_run(exported, model_keys):
    root, corpus = exported
    name = f"init_{len(model_keys)}"
    run_dir = _init_run(root, corpus, name, model_keys)
    ours, _ = load_trained_model(root / "run", torch.device("cpu"))
    # the folder holds the source run's weights, and the new run (one step at lr 1e-12) holds them too
    folder = load_hf_model(root / "hf")
    for k, v in ours.state_dict().items():
        assert torch.equal(folder.state_dict()[k], v), k
    trained, cfg = load_trained_model(run_dir, torch.device("cpu"))
    assert cfg.model.hidden_size == 32 and cfg.model.moe_layer_indices() == [1]
    for k, v in ours.state_dict().items():
        assert torch.allclose(trained.state_dict()[k], v, atol=1e-6), k


def test_conflicting_model_keys_fail_in_one_line(exported):
    root, corpus = exported
    with pytest.raises(ValueError, match=r"train.init_from=hf:.*model.num_experts \(4 -> 8\)") as err:
        _init_run(root, corpus, "conflict", ["model.num_experts=8"])
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("damage,named", [
    (lambda d: (d / "config.json").write_text("[1, 2]"), "config.json"),
    (lambda d: (d / "config.json").write_text("{not json"), "config.json"),
    (lambda d: (d / "config.json").unlink(), "config.json"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
     "model.safetensors"),
])
def test_damaged_folder_fails_in_one_line(exported, tmp_path, damage, named):
    import shutil

    root, corpus = exported
    shutil.copytree(root / "hf", tmp_path / "hf")
    damage(tmp_path / "hf")
    args = DATA_AND_TRAIN + ["data=text", f"data.path={corpus}", f"train.init_from=hf:{tmp_path / 'hf'}"]
    with pytest.raises(ValueError, match="train.init_from=hf:") as err:
        run(run_config(args), tmp_path / "run", args)
    assert named in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("overrides,keys", [
    (["model.hidden_size=8", "+model.qk_norm=true", "train.max_steps=3"], {"hidden_size", "qk_norm"}),
    (["model=demo", "model.hidden_size=8"], None),
    (["data.seq_len=8"], set()),
])
def test_model_keys_set(overrides, keys):
    assert model_keys_set(overrides) == keys



def test_a_scalar_head_follows_the_stage_not_the_source(monkeypatch):
    """A reward model from a model without a head keeps its own fresh head; a policy from a
    reward model leaves the head out; the trunk is loaded either way."""
    from h64lm.model import H64LMConfig, H64LMForCausalLM
    from h64lm.train import init_from

    base = dict(vocab_size=97, hidden_size=32, num_layers=2, num_attention_heads=4, num_kv_heads=2,
                intermediate_size=48, moe_intermediate_size=24, num_experts=4, num_experts_per_token=2)
    torch.manual_seed(0)
    plain = H64LMForCausalLM(H64LMConfig(**base))
    torch.manual_seed(1)
    scored = H64LMForCausalLM(H64LMConfig(**base, score_head=True))
    for source, target in ((plain, scored), (scored, plain)):
        torch.manual_seed(2)
        fresh = H64LMForCausalLM(target.config)
        head = None if fresh.score is None else fresh.score.weight.clone()
        monkeypatch.setattr(init_from, "_source", lambda _: (source.config, source.state_dict()))
        logs = []
        init_from.initialize_from(fresh, "RUN", 0.0, 0, logs.append)
        assert torch.equal(fresh.embed_tokens.weight, source.embed_tokens.weight)
        assert torch.equal(fresh.layers[1].attn.qkv_proj.weight, source.layers[1].attn.qkv_proj.weight)
        if head is not None:
            assert torch.equal(fresh.score.weight, head)
        assert "scalar head" in logs[0]
