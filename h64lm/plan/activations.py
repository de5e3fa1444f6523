"""Activation bytes of one micro-batch: the tensors autograd saves for backward, op by op.

Derived from the ops H64LM actually runs (h64lm/model/*) and checked against the bytes that
`torch.autograd.graph.saved_tensors_hooks` sees (tests/plan/test_activations.py). Notation: N = B*T
tokens, d hidden, q = H*D and kv = H_kv*D attention widths, I the SwiGLU width, E experts, k
routed per token, M = N*k expert rows, a = bytes of the compute dtype (4 fp32, 2 under bf16
autocast). The residual stream, RMSNorm (computed in fp32), the router and the loss stay fp32
under autocast; everything a matmul consumes or produces is in the compute dtype.

Per block:  attention   x_hat, r (fp32) + W_qkv input (a) + qkv output + rotated q/k + SDPA output
                        (a) + SDPA's log-sum-exp [B, H, T] (fp32)
            dense FFN   x_hat, r + W_gate_up input + its [N, 2I] output + silu(gate) + the product
            MoE FFN     x_hat, r + router input/logits/probs (fp32) + top-k ids/weights + the
                        expert-order index and its inverse (int64 [M]) + per expert row: input,
                        [M, 2I] gate/up, silu, product, output (a) and gate weight (fp32)
                        + shared experts as a SwiGLU of width S*I + z-loss logits (fp32)
Outside:    token ids (int64), rotary cos/sin, final x_hat, r, and the chunked cross-entropy's
            saved gradients: dL/dh [N, d] and dL/dW_head [V, d] (fp32, independent of N).
Gradient checkpointing keeps only each block's input [N, d] (fp32); backward recomputes one block
at a time, so one block's saved tensors come back transiently.
SDPA is counted as a fused kernel (flash / CPU flash: no [T, T] matrix). The unfused math path
that an additive bias (ALiBi, a window shorter than T, padding) may select on a GPU also keeps
the [B, H, T, T] probabilities: see `attention_matrix_bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass

from h64lm.model.config import H64LMConfig

__all__ = ["ActivationBytes", "activation_bytes", "attention_matrix_bytes", "PRECISIONS"]

PRECISIONS = {"fp32": 4, "bf16": 2}  # bf16 = autocast over fp32 master weights
F32, I64 = 4, 8


def _norm(N: int, d: int) -> int:
    return F32 * N * d + F32 * N  # x_hat, r


def _swiglu(N: int, d: int, width: int, a: int, input_saved: bool) -> int:
    # input (unless shared with another saved tensor), [N, 2I] gate/up, silu(gate), silu * up
    return a * N * (d * input_saved + 4 * width)


def _attention(c: H64LMConfig, B: int, T: int, a: int) -> int:
    N, D = B * T, c.head_dim
    q, kv = c.num_attention_heads * D, c.num_kv_heads * D
    return (_norm(N, c.hidden_size) + a * N * c.hidden_size  # W_qkv input
            + a * N * (q + 2 * kv)  # qkv output: v is a view of it and keeps it alive
            + a * N * (q + kv) * c.uses_rope  # rotated q, k (one tensor); else views of qkv
            + a * N * q  # SDPA output, also W_o's input (a view)
            + F32 * B * c.num_attention_heads * T)  # log-sum-exp


def _moe(c: H64LMConfig, N: int, a: int) -> int:
    d, E, k, width = c.hidden_size, c.num_experts, c.num_experts_per_token, c.expert_intermediate_size
    M = N * k
    router = (F32 * N * d  # router input: the (fp32) norm output
              + 2 * F32 * N * E  # softmax output; logits for the z-loss's logsumexp
              + I64 * N * k + F32 * N  # top-k ids, the z-loss's logsumexp
              + (F32 * N * k + F32 * N if c.normalize_topk else 0)  # renormalising: top-k probs and their sum
              + F32 * E)  # f_i in the Switch loss
    dispatch = 2 * I64 * M + 4 * E  # expert-order index + inverse, int32 offsets
    experts = _swiglu(M, d, width, a, True) + a * M * d + F32 * M  # + output, gate weight
    shared = 0
    if c.num_shared_experts:
        # in fp32 the shared experts read the router's input tensor; under autocast a bf16 copy
        shared = _swiglu(N, d, c.num_shared_experts * width, a, a != F32)
    return _norm(N, d) + router + dispatch + experts + shared


def _block(c: H64LMConfig, B: int, T: int, a: int, sparse: bool) -> int:
    N = B * T
    ffn = (_moe(c, N, a) if sparse
           else _norm(N, c.hidden_size) + _swiglu(N, c.hidden_size, c.intermediate_size, a, True))
    rotary = 2 * a * T * c.head_dim if (c.uses_rope and a != F32) else 0  # per-layer cast copy
    return _attention(c, B, T, a) + ffn + rotary


def attention_matrix_bytes(config: H64LMConfig, micro_batch: int, seq_len: int,
                           precision: str) -> int:
    """Extra bytes per layer if SDPA falls back to its unfused math path: the [B, H, T, T]
    attention probabilities (compute dtype)."""
    return (PRECISIONS[precision] * micro_batch * config.num_attention_heads * seq_len ** 2)


@dataclass
class ActivationBytes:
    saved: int  # held from the end of forward until backward reaches them
    recompute: int  # with checkpointing: one block's saved tensors, rebuilt during backward
    per_block_max: int  # the largest block's saved tensors without checkpointing

    @property
    def peak(self) -> int:
        return self.saved + self.recompute


def activation_bytes(config: H64LMConfig, micro_batch: int, seq_len: int, precision: str = "fp32",
                     checkpointing: bool = False) -> ActivationBytes:
    """Saved-for-backward bytes of one micro-batch [micro_batch, seq_len] on one rank (balanced
    routing assumed: with expert parallelism a rank receives on average the N*k rows it sends)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r} must be one of {', '.join(PRECISIONS)}")
    c, B, T, a = config, micro_batch, seq_len, PRECISIONS[precision]
    N, d = B * T, c.hidden_size
    sparse = len(c.moe_layer_indices())
    # every block of a kind saves the same tensors: (bytes of one block, blocks of that kind)
    kinds = [(_block(c, B, T, a, False), c.num_layers - sparse), (_block(c, B, T, a, True), sparse)]
    kinds = [(size, count) for size, count in kinds if count]
    largest = max(size for size, _ in kinds)
    rotary_fp32 = 2 * F32 * T * c.head_dim if c.uses_rope else 0  # cos/sin, built once
    # the additive bias [1, H|1, T, T] (compute dtype), built once, read by every layer
    window = c.sliding_window is not None and c.sliding_window < T
    bias = a * (c.num_attention_heads if c.uses_alibi else 1) * T * T if (
        c.uses_alibi or window) else 0
    outside = (I64 * N  # token ids (embedding backward)
               + _norm(N, d)  # final norm
               + F32 * N * d + F32 * c.vocab_size * d)  # CE's saved dL/dh and dL/dW_head
    if checkpointing:
        # each block's input is kept; cos/sin and the bias are inputs of every block
        return ActivationBytes(saved=outside + c.num_layers * F32 * N * d + rotary_fp32 + bias,
                               recompute=largest, per_block_max=largest)
    # in fp32 the blocks save cos/sin themselves (no cast copy): the one table counts once
    return ActivationBytes(saved=outside + sum(size * count for size, count in kinds)
                           + rotary_fp32 * (a == F32) + bias, recompute=0, per_block_max=largest)
