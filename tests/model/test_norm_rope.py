"""RMSNorm and rotary embeddings have hand-written backward passes (one autograd node each, for
speed): both are checked against the plain formulas, differentiated by autograd, and with
gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F

from h64lm.model.norm import rms_norm
from h64lm.model.rope import RotaryEmbedding, apply_rotary


def _reference_rms_norm(x, w, eps):
    x32 = x.float()
    return w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _reference_rotary(x, positions, theta):
    """x [B, T, H, D], positions [T]: half-split rotation written from the RoFormer formula."""
    d = x.shape[-1]
    freq = theta ** (-torch.arange(0, d, 2, dtype=torch.float64) / d)  # [D/2]
    angle = positions[:, None].double() * freq  # [T, D/2]
    cos, sin = angle.cos()[None, :, None].float(), angle.sin()[None, :, None].float()
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def test_rms_norm_matches_autograd_of_the_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, requires_grad=True)
    w = (1 + 0.1 * torch.randn(16)).requires_grad_()
    g = torch.randn(3, 5, 16)
    ours = rms_norm(x, w, 1e-5)
    ref = _reference_rms_norm(x, w, 1e-5)
    assert torch.allclose(ours, ref, atol=1e-6)
    grads = torch.autograd.grad(ours, (x, w), g)
    ref_grads = torch.autograd.grad(ref, (x, w), g)
    for a, b in zip(grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.allclose(rms_norm(x, w, 1e-5), F.rms_norm(x, (16,), w, 1e-5), atol=1e-6)


def test_rms_norm_gradcheck_and_low_precision_output_dtype():
    x = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: rms_norm(a, b, 1e-5), (x, w))
    xb = torch.randn(4, 8, dtype=torch.bfloat16)
    wb = torch.ones(8)
    out = rms_norm(xb, wb, 1e-5)
    assert out.dtype == torch.float32  # promote(bf16 activations, fp32 weight), as the reference
    assert torch.equal(out, _reference_rms_norm(xb, wb, 1e-5))


@pytest.mark.parametrize("theta", [10000.0, 500.0])
def test_rotary_matches_formula_and_autograd(theta):
    torch.manual_seed(0)
    B, T, H, D = 2, 7, 3, 8
    rope = RotaryEmbedding(D, theta, initial_length=4)  # grows past its initial length
    positions = torch.arange(T)
    cos, sin = rope(positions[None], T)
    x = torch.randn(B, T, H, D, requires_grad=True)
    ours = apply_rotary(x, cos, sin)
    ref = _reference_rotary(x, positions, theta)
    assert torch.allclose(ours, ref, atol=1e-5)
    g = torch.randn_like(ours)
    (grad,) = torch.autograd.grad(ours, x, g)
    (ref_grad,) = torch.autograd.grad(ref, x, g)
    assert torch.allclose(grad, ref_grad, atol=1e-5)
    # a rotation keeps each pair's norm
    assert torch.allclose(ours.norm(dim=-1), x.norm(dim=-1), atol=1e-5)


def test_rotary_gradcheck():
    rope = RotaryEmbedding(4, 10000.0, initial_length=8)
    cos, sin = rope(torch.tensor([[0, 3, 5]]), 8)
    x = torch.randn(1, 3, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a: apply_rotary(a, cos.double(), sin.double()), (x,))
