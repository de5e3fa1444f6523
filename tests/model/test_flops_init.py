"""FLOPs against a hand count, initialisation scales, gradient checkpointing."""

import math

import pytest
import torch

from h64lm.model import H64LMConfig, flops_per_token


def test_flops_per_token_matches_hand_count():
    cfg = H64LMConfig(vocab_size=100, hidden_size=16, num_layers=2, num_attention_heads=4,
                      num_kv_heads=2, intermediate_size=32, moe_intermediate_size=8,
                      num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                      moe_layers=[1], sliding_window=3)
    # per layer attention weights: q 16x16, k 16x8, v 16x8, o 16x16 = 768
    # layer 0 dense SwiGLU: 3*16*32 = 1536; layer 1: router 16*4 = 64 + (2+1) experts * 3*16*8
    # head 100*16 = 1600
    matmul = 2 * 768 + 1536 + 64 + 3 * 384 + 1600
    # T=5, W=3: keys per query 1,2,3,3,3 -> mean 12/5
    attention = 2 * 12 * 4 * 4 * (12 / 5)
    assert flops_per_token(cfg, 5) == pytest.approx(6 * matmul + attention)


def test_flops_without_window_use_causal_average():
    cfg = H64LMConfig(vocab_size=10, hidden_size=8, num_layers=1, num_attention_heads=2,
                      num_kv_heads=2, intermediate_size=4, moe_layers="none")
    matmul = 4 * 8 * 8 + 3 * 8 * 4 + 10 * 8
    assert flops_per_token(cfg, 9) == pytest.approx(6 * matmul + 12 * 8 * 5)


def test_initialisation_scales_output_projections(small_model):
    model = small_model(hidden_size=256, num_layers=8, num_attention_heads=4,
                        intermediate_size=512, moe_intermediate_size=256)
    std = model.config.initializer_range
    block = model.layers[1]
    assert block.attn.qkv_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    scaled = std / math.sqrt(2 * 8)
    assert block.attn.o_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert block.ffn.experts.down_proj.std().item() == pytest.approx(scaled, rel=0.05)
    assert model.layers[0].ffn.down_proj.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert torch.equal(block.attn_norm.weight, torch.ones(256))


def test_tied_embeddings_share_one_matrix(small_model):
    model = small_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
