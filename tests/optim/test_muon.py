"""Muon + AdamW: every matrix's update is torch.optim.Muon's on that matrix alone,
the rest is torch.optim.AdamW's; the split between them; the config keys."""

import copy

import pytest
import torch

from h64lm.config import ConfigError, OptimConfig
from h64lm.model import H64LMConfig, H64LMForCausalLM
from h64lm.model.moe.experts import Experts
from h64lm.objectives.lm import lm_loss
from h64lm.optim import muon
from h64lm.optim.muon import NS_DTYPES, Matrix, MuonAdamW, matrices, newton_schulz
from h64lm.optim.optimizer import build_optimizer

MUON = dict(momentum=0.95, nesterov=True, ns_steps=5)


def _muon_group(params, lr=0.02, wd=0.1, adjust="original"):
    return dict(params=params, use_muon=True, lr=lr, weight_decay=wd, adjust_lr=adjust, ns_dtype="bf16", **MUON)


def _reference_steps(W, grads, lr=0.02, wd=0.1, adjust=None):
    """torch.optim.Muon on one stand-alone 2-D parameter [out, in], contiguous as an nn.Linear's."""
    p = torch.nn.Parameter(W.contiguous().clone())
    opt = torch.optim.Muon([p], lr=lr, weight_decay=wd, adjust_lr_fn=adjust, **MUON)
    for g in grads:
        p.grad = g.contiguous().clone()
        opt.step()
    return p.detach()


@pytest.mark.parametrize("adjust", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("split", [False, True])
def test_each_expert_matrix_gets_torch_muons_update_of_that_matrix_alone(split, adjust):
    torch.manual_seed(0)
    E, d, width = 3, 8, 12
    experts = Experts(E, d, width)  # gate_up [E, d, 2*width], down [E, width, d]
    for w in experts.parameters():
        torch.nn.init.normal_(w, std=0.1)
    start = {n: w.detach().clone() for n, w in experts.named_parameters()}
    layouts = {experts.gate_up_proj: Matrix(True, (width, width) if split else None),
               experts.down_proj: Matrix(True)}
    opt = MuonAdamW([_muon_group(list(layouts), adjust=adjust)], layouts)
    grads = {n: [torch.randn_like(w) for _ in range(3)] for n, w in experts.named_parameters()}
    for i in range(3):  # three steps: the momentum buffers count too
        for n, w in experts.named_parameters():
            w.grad = grads[n][i].clone()
        opt.step()
    for name, w in experts.named_parameters():
        layout = layouts[w]
        blocks = zip(matrices(w.detach(), layout), matrices(start[name], layout),
                     *[matrices(g, layout) for g in grads[name]])
        count = 0
        for got, W0, *gs in blocks:  # each [out, in], an nn.Linear weight's orientation
            expect = _reference_steps(W0, gs, adjust=None if adjust == "original" else adjust)
            # a layer's experts go through Newton-Schulz as one bmm batch, whose bf16 sums may round
            # apart from mm's: 1e-5 is ~1/1000 of a step's update (treating the stack as one matrix
            # misses by > 1e-3, the test below)
            torch.testing.assert_close(got, expect, rtol=0, atol=1e-5, msg=name)
            count += 1
        assert count == E * (2 if split and name == "gate_up_proj" else 1)


def test_a_matrix_over_the_batch_budget_goes_alone_bit_for_bit(monkeypatch):
    """NS_BATCH_NUMEL caps a batched call's size (memory on large models); below one matrix, every
    matrix takes torch.optim.Muon's own 2-D path and its update is torch's exactly."""
    monkeypatch.setattr(muon, "NS_BATCH_NUMEL", 1)
    torch.manual_seed(6)
    w = torch.nn.Parameter(torch.randn(4, 8, 24) * 0.1)  # 4 experts, [in 8, out 24] each
    start = w.detach().clone()
    opt = MuonAdamW([_muon_group([w])], {w: Matrix(True)})
    grads = [torch.randn_like(w) for _ in range(2)]
    for g in grads:
        w.grad = g.clone()
        opt.step()
    for e in range(4):
        expect = _reference_steps(start[e].T, [g[e].T for g in grads])
        assert torch.equal(w.detach()[e].T, expect), e


def test_stacked_experts_are_not_orthogonalised_as_one_matrix():
    """The test above can fail: treating [E, in, out] as one [E*in, out] matrix differs."""
    torch.manual_seed(1)
    w = torch.nn.Parameter(torch.randn(2, 6, 4))
    layouts = {w: Matrix(True)}
    opt = MuonAdamW([_muon_group([w])], layouts)
    w.grad = torch.randn_like(w)
    g = w.grad.clone()
    before = w.detach().clone()
    opt.step()
    whole = _reference_steps(before.reshape(12, 4).T, [g.reshape(12, 4).T]).T.reshape(2, 6, 4)
    assert not torch.allclose(w.detach(), whole, atol=1e-3)


def test_fused_qkv_splits_into_q_k_v_for_torch_muon():
    torch.manual_seed(2)
    W = torch.nn.Parameter(torch.randn(16, 8) * 0.1)  # q 8 rows, k 4, v 4
    g = torch.randn_like(W)
    start = W.detach().clone()
    opt = MuonAdamW([_muon_group([W])], {W: Matrix(out_splits=(8, 4, 4))})
    W.grad = g.clone()
    opt.step()
    expect = torch.cat([_reference_steps(w0, [g0]) for w0, g0 in zip(start.split((8, 4, 4)), g.split((8, 4, 4)))])
    assert torch.equal(W.detach(), expect)
    assert not torch.allclose(expect, _reference_steps(start, [g]), atol=1e-3)


def test_adamw_part_equals_torch_adamw():
    torch.manual_seed(3)
    a = [torch.nn.Parameter(torch.randn(5, 3)), torch.nn.Parameter(torch.randn(7))]
    b = [torch.nn.Parameter(p.detach().clone()) for p in a]
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    ours = MuonAdamW([dict(params=a, use_muon=False, **kw)], {})
    ref = torch.optim.AdamW(b, foreach=True, **kw)
    for _ in range(3):
        g = [torch.randn_like(p) for p in a]
        for p, q, gi in zip(a, b, g):
            p.grad, q.grad = gi.clone(), gi.clone()
        ours.step()
        ref.step()
    assert all(torch.equal(p, q) for p, q in zip(a, b))


def test_tiny_model_split_hidden_matrices_to_muon_the_rest_to_adamw():
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64, num_shared_experts=1))
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    names = {id(p): n for n, p in model.named_parameters()}
    muon = {names[id(p)] for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adamw = {names[id(p)] for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    suffixes = ("qkv_proj.weight", "o_proj.weight", "gate_up_proj.weight", "down_proj.weight",
                "experts.gate_up_proj", "experts.down_proj")
    assert muon == {n for n in names.values() if n.endswith(suffixes)}
    assert adamw == set(names.values()) - muon
    assert any(".router." in n for n in adamw) and "embed_tokens.weight" in adamw
    assert {g["lr"] for g in opt.param_groups if g["use_muon"]} == {0.02}


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(4)
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64))
    cfg = OptimConfig(name="muon")
    x = torch.randint(0, 64, (2, 8))

    def step(m, o):
        lm_loss(m(x, labels=x), m.config).backward()
        o.step()
        o.zero_grad()

    opt = build_optimizer(model, cfg, torch.device("cpu"))
    step(model, opt)
    twin = H64LMForCausalLM(H64LMConfig(vocab_size=64))
    twin.load_state_dict(model.state_dict())
    twin_opt = build_optimizer(twin, cfg, torch.device("cpu"))
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))  # as from disk: no shared tensors
    step(model, opt)
    step(twin, twin_opt)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), twin.parameters()))


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_newton_schulz_batch_orthogonalises_each_matrix_as_alone(dtype):
    torch.manual_seed(5)
    G = torch.randn(6, 24, 8)  # tall: iterated on the wide orientation
    batch = newton_schulz(G, 5, dtype=NS_DTYPES[dtype]).float()
    for g, o in zip(G, batch):
        torch.testing.assert_close(o, newton_schulz(g, 5, dtype=NS_DTYPES[dtype]).float(),
                                   rtol=0, atol=0.02 if dtype == "bf16" else 1e-5)
        s = torch.linalg.svdvals(o)  # quintic NS: singular values near 1, not exactly
        assert s.min() > 0.5 and s.max() < 1.3, s


def test_ns_dtype_auto_is_bf16_on_gpu_fp32_on_cpu():
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64))

    def ns_dtype(device, key="auto"):
        opt = build_optimizer(model, OptimConfig(name="muon", muon_ns_dtype=key), torch.device(device))
        return {g["ns_dtype"] for g in opt.param_groups if g["use_muon"]}

    assert ns_dtype("cpu") == {"fp32"} and ns_dtype("cuda") == {"bf16"} and ns_dtype("cpu", "bf16") == {"bf16"}


def test_a_checkpoint_from_before_ns_dtype_resumes_in_bf16():
    torch.manual_seed(7)
    model = H64LMForCausalLM(H64LMConfig(vocab_size=64))
    opt = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    x = torch.randint(0, 64, (2, 8))
    lm_loss(model(x, labels=x), model.config).backward()
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    assert [g.pop("ns_dtype") for g in saved["param_groups"] if g["use_muon"]] == ["fp32"]  # CPU: auto
    again = build_optimizer(model, OptimConfig(name="muon"), torch.device("cpu"))
    again.load_state_dict(saved)
    again.step()  # raised KeyError: 'ns_dtype'
    assert [g["ns_dtype"] for g in again.param_groups if g["use_muon"]] == ["bf16"]


@pytest.mark.parametrize("key, value", [("name", "sgd"), ("muon_lr", 0.0), ("muon_momentum", 1.0),
                                        ("muon_ns_steps", 0), ("muon_ns_steps", 100),
                                        ("muon_weight_decay", -0.1), ("muon_adjust_lr", "spectral"),
                                        ("muon_ns_dtype", "fp16")])
def test_bad_muon_keys_fail_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key}="):
        OptimConfig(**{key: value})
