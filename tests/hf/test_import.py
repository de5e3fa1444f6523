"""import_hf: folders that transformers builds locally (Mixtral, Llama, Mistral) and our custom
export become H64LM models with the same logits; unsupported options fail with one line."""

import dataclasses
import json

import pytest
import torch
import transformers

from h64lm.hf import export_hf, import_hf, load_hf_model
from tests.hf.tiny import VOCAB, tiny_model

COMMON = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, intermediate_size=40, max_position_embeddings=64,
              rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 5000.0})


def saved_stock(tmp_path, cls_name, **overrides):
    config = getattr(transformers, cls_name + "Config")(**{**COMMON, **overrides})
    torch.manual_seed(0)
    hf = getattr(transformers, cls_name + "ForCausalLM")(config).eval()
    with torch.no_grad():  # HF initialises norms to one: randomise them so a mix-up shows
        for name, p in hf.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        for name, b in [*hf.named_parameters(), *hf.named_buffers()]:
            if name.endswith("e_score_correction_bias"):  # a selection bias that changes choices
                b.copy_(torch.randn_like(b) * 0.1)
    hf.save_pretrained(str(tmp_path))
    return hf


@pytest.mark.parametrize("cls_name,overrides", [
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    ("Mixtral", dict(num_local_experts=4, num_experts_per_tok=1, sliding_window=6,
                     tie_word_embeddings=True)),
    ("Llama", dict()),
    ("Mistral", dict(sliding_window=6)),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=1, moe_intermediate_size=24, qkv_bias=False,
                      shared_expert_intermediate_size=0, mlp_only_layers=[0], norm_topk_prob=False)),
    ("Qwen3", dict(head_dim=8)),
    ("Qwen3Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8,
                      norm_topk_prob=True)),
    ("Ernie4_5_Moe", dict(moe_num_experts=4, moe_k=2, moe_intermediate_size=24, moe_layer_start_index=1,
                          moe_num_shared_experts=1)),
    ("Glm4Moe", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8,
                     first_k_dense_replace=1, n_shared_experts=1, use_qk_norm=True, norm_topk_prob=True,
                     rope_parameters={"rope_type": "default", "rope_theta": 5000.0, "partial_rotary_factor": 1.0})),
])
@torch.no_grad()
def test_stock_folder_imports_with_same_logits(tmp_path, cls_name, overrides):
    hf = saved_stock(tmp_path, cls_name, **overrides)
    ours = load_hf_model(tmp_path)
    assert ours.config.rope_theta == 5000.0 and ours.config.rms_norm_eps == 1e-6
    ids = torch.randint(0, VOCAB, (2, 19))
    ref = hf(ids).logits
    assert ref.std() > 0.05
    assert (ours(ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("overrides", [
    dict(moe_layers="alternate", position_encoding="alibi", num_shared_experts=1,
         sliding_window=5, capacity_factor=2.0),
    dict(moe_layers=[0], tie_word_embeddings=True, position_encoding="rope+alibi"),
    dict(moe_layers="all", qk_norm=True, logit_softcap=5.0, init="small"),
])
@torch.no_grad()
def test_custom_export_round_trips(tmp_path, tiny_tokenizer_dir, overrides):
    ours = tiny_model(**overrides)
    export_hf(ours, tiny_tokenizer_dir, tmp_path, max_shard_size="30KB")
    config, state = import_hf(tmp_path)
    # "alternate" comes back as the list it resolves to; every other field comes back as is
    assert config.moe_layer_indices() == ours.config.moe_layer_indices()
    assert dataclasses.replace(config, moe_layers=ours.config.moe_layers) == ours.config
    back = load_hf_model(tmp_path)
    ids = torch.randint(0, VOCAB, (2, 15))
    assert torch.equal(back(ids).logits, ours(ids).logits)


@pytest.mark.parametrize("cls_name,overrides,unsupported", [
    ("Llama", dict(attention_bias=True), "attention_bias"),
    ("Llama", dict(mlp_bias=True), "mlp_bias"),
    ("Llama", dict(hidden_act="gelu"), "hidden_act"),
    ("Llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                    "rope_theta": 10000.0}), "rope_type"),
    ("Llama", dict(head_dim=16), "head_dim"),
    ("Qwen2", dict(), "model_type='qwen2'"),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24), "qkv_bias=true"),
    ("Qwen2Moe", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, qkv_bias=False,
                      shared_expert_intermediate_size=24), "shared_expert_gate"),  # a gated shared expert
    ("Glm4Moe", dict(n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=24, head_dim=8),
     "partial_rotary_factor"),  # GLM's default rotates half of each head
])
def test_unsupported_options_fail_with_one_line(tmp_path, cls_name, overrides, unsupported):
    saved_stock(tmp_path, cls_name, **overrides)
    with pytest.raises(ValueError, match=unsupported) as err:
        import_hf(tmp_path)
    assert "\n" not in str(err.value)


def test_missing_folder_is_one_line(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        import_hf(tmp_path / "nope")


def _rewrite_weights(folder, change):
    from safetensors.torch import load_file, save_file

    path = next(p for p in sorted(folder.iterdir()) if p.suffix == ".safetensors")
    state = load_file(str(path))
    change(state)
    save_file(state, str(path), metadata={"format": "pt"})


def _first_expert(state):
    return next(k for k in state if "experts" in k)


DAMAGES = {
    "config_not_object": (lambda d: (d / "config.json").write_text('["a", "list"]'), "config.json"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{"), "config.json"),
    "config_lacks_a_key": (lambda d: (d / "config.json").write_text(
        json.dumps({k: v for k, v in json.loads((d / "config.json").read_text()).items() if k != "hidden_size"})),
        "config.json"),
    "no_weights": (lambda d: (d / "model.safetensors").unlink(), "model.safetensors"),
    "truncated": (lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-64]),
                  "model.safetensors"),
    "garbage_header": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors"),
    "wrong_shape": (lambda d: _rewrite_weights(d, lambda s: s.update(
        {_first_expert(s): torch.zeros(3, 5, 7)})), "experts"),
    "missing_tensor": (lambda d: _rewrite_weights(d, lambda s: s.pop(_first_expert(s))), "experts"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
@pytest.mark.parametrize("overrides", [dict(moe_layers="alternate"), dict(moe_layers="alternate", position_encoding="alibi")],
                         ids=["stock", "custom"])
def test_damaged_folder_is_one_line_naming_the_file(tmp_path, tiny_tokenizer_dir, damage, overrides):
    """The default layout exports to a stock class, ALiBi to the custom format: both readers."""
    export_hf(tiny_model(**overrides), tiny_tokenizer_dir, tmp_path)
    make, named = DAMAGES[damage]
    make(tmp_path)
    with pytest.raises(ValueError, match=named) as err:
        import_hf(tmp_path)
    assert "\n" not in str(err.value)


def test_index_naming_a_missing_shard_is_one_line(tmp_path, tiny_tokenizer_dir):
    export_hf(tiny_model(), tiny_tokenizer_dir, tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ValueError, match=f"{shard.name} is missing") as err:
        import_hf(tmp_path)
    assert "\n" not in str(err.value)
