"""Our model against Hugging Face Mixtral (every layer MoE, through `h64lm.hf.stock`) and Llama
(every layer dense), with the same weights copied over: same logits and, for Mixtral, the same
expert choice for every token."""

import pytest
import torch
from transformers import LlamaForCausalLM

from h64lm.hf.stock import to_hf_mixtral, to_hf_stock
from h64lm.model import H64LMConfig, H64LMForCausalLM


@pytest.mark.parametrize("tied", [False, True])
@torch.no_grad()
def test_matches_mixtral_logits_and_routing(small_model, tied):
    ours = small_model(moe_layers="all", position_encoding="rope", num_experts=8,
                       tie_word_embeddings=tied)
    cfg = ours.config
    hf = to_hf_mixtral(ours)
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tied

    chosen = []
    hooks = [b.ffn.router.register_forward_hook(lambda m, i, o: chosen.append(o.experts))
             for b in ours.layers]
    input_ids = torch.randint(0, cfg.vocab_size, (3, 17))
    out = ours(input_ids)
    for h in hooks:
        h.remove()
    ref = hf(input_ids, output_router_logits=True)

    assert out.logits.std() > 0.05
    assert (out.logits - ref.logits).abs().max().item() <= 1e-4
    assert len(ref.router_logits) == cfg.num_layers
    for ours_experts, hf_logits in zip(chosen, ref.router_logits):
        hf_experts = hf_logits.topk(cfg.num_experts_per_token, dim=-1).indices
        assert torch.equal(ours_experts.sort(-1).values, hf_experts.sort(-1).values)


@torch.no_grad()
def test_matches_llama_without_moe(small_model):
    ours = small_model(moe_layers="none", position_encoding="rope")
    cfg = ours.config
    hf = to_hf_stock(ours).eval()
    assert isinstance(hf, LlamaForCausalLM)
    input_ids = torch.randint(0, cfg.vocab_size, (2, 23))
    diff = (ours(input_ids).logits - hf(input_ids).logits).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize("override,option", [
    (dict(moe_layers="alternate"), "model.moe_layers"),
    (dict(position_encoding="rope+alibi"), "model.position_encoding"),
    (dict(num_shared_experts=1), "model.num_shared_experts"),
    (dict(capacity_factor=1.25), "model.capacity_factor"),
])
def test_mixtral_export_rejects_what_mixtral_cannot_express(override, option):
    fields = dict(vocab_size=50, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_kv_heads=2, intermediate_size=48, moe_layers="all", position_encoding="rope")
    cfg = H64LMConfig(**{**fields, **override})
    with pytest.raises(ValueError, match=option):
        to_hf_mixtral(H64LMForCausalLM(cfg))


def test_training_loss_and_gradients_match_mixtral(small_model):
    """What the benchmark times is the same computation: our chunked CE on aligned labels and
    Mixtral's CE on the same labels (given as `shift_labels`, so it does not shift them again)."""
    ours = small_model(moe_layers="all", position_encoding="rope").train()
    hf = to_hf_mixtral(ours)
    ids = torch.randint(0, ours.config.vocab_size, (2, 13))
    x, y = ids[:, :-1].contiguous(), ids[:, 1:].contiguous()
    ce = ours(x, labels=y, return_logits=False).ce
    ref = hf(input_ids=x, labels=y, shift_labels=y).loss
    assert ce.item() == pytest.approx(ref.item(), rel=1e-5)
    ce.backward()
    ref.backward()
    assert torch.allclose(ours.lm_head.weight.grad, hf.lm_head.weight.grad, atol=1e-6)
    ours_experts = ours.layers[1].ffn.experts.down_proj.grad.transpose(1, 2)
    assert torch.allclose(ours_experts, hf.model.layers[1].mlp.experts.down_proj.grad, atol=1e-6)
    q_dim = ours.config.num_attention_heads * ours.config.head_dim
    assert torch.allclose(ours.layers[0].attn.qkv_proj.weight.grad[:q_dim],
                          hf.model.layers[0].self_attn.q_proj.weight.grad, atol=1e-6)
