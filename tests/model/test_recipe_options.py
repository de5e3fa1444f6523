"""qk_norm, logit_softcap and init against naive references; the HF export computes them too."""

import math

import pytest
import torch
import torch.nn.functional as F

from h64lm.hf import to_hf_model
from h64lm.hf.stock import stock_architecture
from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.model.attention import Attention
from h64lm.model.loss import chunked_cross_entropy
from h64lm.validation import ConfigError
from tests.hf.tiny import VOCAB, tiny_model


def _perturb(module, seed=0):
    """Random weights everywhere, norms included (ones would hide a swapped q/k norm)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p + 0.2 * torch.randn(p.shape, generator=g))


def _rms(x, w, eps):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


@torch.no_grad()
def test_qk_norm_attention_equals_a_naive_loop_over_heads():
    cfg = H64LMConfig(hidden_size=32, num_attention_heads=4, num_kv_heads=2, qk_norm=True)
    attn = Attention(cfg, 0)
    _perturb(attn)
    x = torch.randn(2, 7, 32)
    out = attn(x, rotary=None, bias=None, is_causal=True, cache=None)
    H, H_kv, D = 4, 2, 8
    qkv = x @ attn.qkv_proj.weight.T
    q, k, v = qkv.split((H * D, H_kv * D, H_kv * D), dim=-1)
    heads = []
    for h in range(H):
        g = h // (H // H_kv)  # the key/value head this query head shares
        q_h = _rms(q[..., h * D:(h + 1) * D], attn.q_norm.weight, cfg.rms_norm_eps)
        k_h = _rms(k[..., g * D:(g + 1) * D], attn.k_norm.weight, cfg.rms_norm_eps)
        scores = q_h @ k_h.transpose(1, 2) / math.sqrt(D)
        scores = scores.masked_fill(torch.ones(7, 7).triu(1).bool(), -math.inf)
        heads.append(scores.softmax(-1) @ v[..., g * D:(g + 1) * D])
    expect = torch.cat(heads, -1) @ attn.o_proj.weight.T
    assert (out - expect).abs().max() < 1e-5


@torch.no_grad()
def test_qk_norm_makes_attention_blind_to_the_scale_of_w_q():
    for qk_norm in (True, False):
        attn = Attention(H64LMConfig(hidden_size=32, num_attention_heads=4, qk_norm=qk_norm), 0)
        x = torch.randn(1, 5, 32)
        before = attn(x, None, None, True, None)
        attn.qkv_proj.weight[:32] *= 10  # the query rows
        same = torch.allclose(attn(x, None, None, True, None), before, atol=1e-5)
        assert same == qk_norm


@pytest.mark.parametrize("cap", [None, 2.0])
def test_chunked_loss_with_softcap_equals_cross_entropy_of_capped_logits(cap):
    torch.manual_seed(0)
    h = torch.randn(37, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[3] = -100
    ours = chunked_cross_entropy(h, w, labels, chunk=8, softcap=cap)
    gh, gw = torch.autograd.grad(ours, (h, w))
    logits = h @ w.T
    capped = logits if cap is None else cap * torch.tanh(logits / cap)
    ref = F.cross_entropy(capped, labels, ignore_index=-100)
    rh, rw = torch.autograd.grad(ref, (h, w))
    assert ours.item() == pytest.approx(ref.item(), abs=1e-5)
    assert torch.allclose(gh, rh, atol=1e-6) and torch.allclose(gw, rw, atol=1e-6)
    if cap is not None:  # the cap changes the loss here: the test can tell
        assert abs(ref.item() - F.cross_entropy(logits, labels, ignore_index=-100).item()) > 0.1


def test_model_caps_its_logits_and_both_loss_paths_agree():
    torch.manual_seed(1)
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64, logit_softcap=0.5))
    _perturb(model)
    x = torch.randint(0, 64, (2, 9))
    full = model(x, labels=x)
    chunked = model(x, labels=x, return_logits=False)
    assert full.logits.abs().max() <= 0.5 < model.lm_head(model.embed_tokens(x)).abs().max()
    assert full.ce.item() == pytest.approx(chunked.ce.item(), abs=1e-5)


def test_small_init_stds_follow_the_formulas():
    torch.manual_seed(2)
    cfg = H64LMConfig(vocab_size=512, init="small", hidden_size=256, num_attention_heads=4)
    model = H64LMForCausalLM(cfg)
    std, out_std = math.sqrt(2 / (5 * 256)), 2 / (4 * math.sqrt(256))
    assert model.layers[0].attn.qkv_proj.weight.std().item() == pytest.approx(std, rel=0.03)
    assert model.layers[0].attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.03)
    assert model.layers[1].ffn.experts.down_proj.std().item() == pytest.approx(out_std, rel=0.03)
    normal = H64LMForCausalLM(H64LMConfig(vocab_size=512, hidden_size=256, num_attention_heads=4))
    assert normal.layers[0].attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.03)


@pytest.mark.parametrize("options", [dict(qk_norm=True), dict(logit_softcap=3.0),
                                     dict(qk_norm=True, logit_softcap=3.0, init="small")])
@pytest.mark.parametrize("layout", ["none", "all"])
@torch.no_grad()
def test_hf_export_computes_the_options(options, layout):
    ours = tiny_model(moe_layers=layout, **options)
    _perturb(ours)
    # Qwen3 and Qwen3-MoE have q/k norms; no stock class caps logits
    stock = {"none": "Qwen3", "all": "Qwen3Moe"}[layout] if "logit_softcap" not in options else None
    assert (stock_architecture(ours.config) is None) == (stock is None)
    hf = to_hf_model(ours).eval()
    assert type(hf).__name__ == (f"{stock}ForCausalLM" if stock else "H64LMHFForCausalLM")
    ids = torch.randint(0, VOCAB, (2, 13))
    ref = ours(ids).logits
    assert ref.std() > 0.05
    assert (hf(ids).logits - ref).abs().max().item() <= 1e-4


@pytest.mark.parametrize("key, value", [("init", "xavier"), ("logit_softcap", 0.0), ("logit_softcap", -1.0)])
def test_bad_option_values_fail_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}="):
        H64LMConfig(**{key: value})
