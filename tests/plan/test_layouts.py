"""Layout enumeration and the recommendation: sharding when one GPU is too small, EP only where
it divides, tokens/FLOPs/time from their formulas, the report and the CLI."""

import pytest

from h64lm.model.config import H64LMConfig
from h64lm.model.flops import flops_per_token
from h64lm.plan import format_plan, plan_layout, plan_layouts, recommend
from h64lm.plan.__main__ import main

CONFIG = H64LMConfig(vocab_size=32000, hidden_size=1024, num_layers=8, num_attention_heads=8,
                     num_kv_heads=4, intermediate_size=4096, moe_intermediate_size=1024,
                     num_experts=12, moe_layers="all", num_shared_experts=1)  # ~0.5B params
KW = dict(seq_len=1024, micro_batch=2, precision="bf16", peak_tflops=989.0, mfu=0.4)


def test_too_big_for_one_gpu_is_sharded():
    one = plan_layouts(CONFIG, gpus=1, gpu_mem_gb=8, **KW)
    assert recommend(one) is None and "no layout fits" in format_plan(one, "m", 8)
    best = recommend(plan_layouts(CONFIG, gpus=8, gpu_mem_gb=8, **KW))
    assert best is not None and (best.strategy == "fsdp" or best.ep > 1)
    # and it is the cheapest fitting one: nothing that fits is faster
    fitting = [x for x in plan_layouts(CONFIG, gpus=8, gpu_mem_gb=8, **KW) if x.fits]
    assert best.time_s == min(x.time_s for x in fitting)


def test_ep_only_where_it_divides_experts_and_gpus():
    eps = {x.ep for x in plan_layouts(CONFIG, gpus=8, **KW)}
    assert eps == {1, 2, 4}  # 8 does not divide 12 experts
    dense = H64LMConfig(**{**CONFIG.__dict__, "moe_layers": "none"})
    assert {x.ep for x in plan_layouts(dense, gpus=8, **KW)} == {1}
    with pytest.raises(ValueError, match="ep=8 must divide"):
        plan_layout(CONFIG, gpus=8, ep=8, **KW)


def test_one_gpu_prefers_no_checkpointing_when_it_fits():
    best = recommend(plan_layouts(CONFIG, gpus=1, gpu_mem_gb=80, **KW))
    assert (best.strategy, best.ep, best.checkpointing) == ("ddp", 1, False)


def test_tokens_flops_and_time_follow_their_formulas():
    layout = plan_layout(CONFIG, gpus=4, grad_accum=3, strategy="fsdp", checkpointing=True, **KW)
    tokens = 2 * 1024 * 3 * 4
    assert layout.tokens_per_step == tokens
    assert layout.flops_per_step == pytest.approx(flops_per_token(CONFIG, 1024) * tokens)
    assert layout.time_s == pytest.approx(layout.flops_per_step * 4 / 3 / (4 * 989e12 * 0.4))


def test_fsdp_state_shrinks_with_gpus():
    a = plan_layout(CONFIG, gpus=2, strategy="fsdp", **KW)
    b = plan_layout(CONFIG, gpus=8, strategy="fsdp", **KW)
    assert b.params < a.params and b.params >= a.params / 4


def test_cli_prints_plan_and_rejects_bad_keys(capsys):
    assert main(["model=tiny", "gpus=2", "seq_len=128", "micro_batch=2"]) == 0
    assert "recommended:" in capsys.readouterr().out
    assert main(["model=tiny", "gpu=2"]) == 2
    assert "unknown key 'gpu'" in capsys.readouterr().err
