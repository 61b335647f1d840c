"""The hand-written autograd paths of qwen3_moe.py (RMSNorm, fused q/k norm + rotary, grouped experts)
against plain autograd references: fp64 outputs and gradients, fp32 forward bit-identity with HF's op
order, gradcheck, and the experts under `torch.autocast`.

    pytest tests/models/test_fast_paths.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import (
    Attention,
    RMSNorm,
    _QKNormRopeFn,
    _RMSNormFn,
    _rotate_half,
    grouped_experts,
    rotary_cos_sin,
)

# B batch, T tokens, P heads (q then k), hd head dim, D hidden, N tokens, K top-k, E experts, F expert width


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=40, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], rope_theta=1e4)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def reference_experts(x_ND, idx_NK, w_NK, gate_up_EFD, down_EDF):
    """sum_k w[n,k] * SwiGLU_{idx[n,k]}(x[n]), one token and one k at a time."""
    Fe = down_EDF.shape[2]
    rows = []
    for n in range(x_ND.shape[0]):
        acc = torch.zeros_like(x_ND[n])
        for k in range(idx_NK.shape[1]):
            e = int(idx_NK[n, k])
            g, u = gate_up_EFD[e, :Fe] @ x_ND[n], gate_up_EFD[e, Fe:] @ x_ND[n]
            acc = acc + w_NK[n, k] * (down_EDF[e] @ (F.silu(g) * u))
        rows.append(acc)
    return torch.stack(rows)


def plain_rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's Qwen3MoeRMSNorm for float32/float64 inputs."""
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def plain_qk(x_BTPd, w_Pd, cos_BTd, sin_BTd, eps):
    y = plain_rms(x_BTPd, w_Pd, eps)
    cos, sin = cos_BTd[:, :, None], sin_BTd[:, :, None]
    return y * cos + _rotate_half(y) * sin


def signed(sin_BTd: torch.Tensor) -> torch.Tensor:
    s = sin_BTd.clone()
    s[..., : s.shape[-1] // 2] *= -1
    return s


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rmsnorm_fn_matches_plain(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(16, dtype=dtype)).requires_grad_()
    got, ref = _RMSNormFn.apply(x, w, 1e-6), plain_rms(x, w, 1e-6)
    assert torch.equal(got, ref)  # same op sequence: bit-identical forward, in fp32 too
    cot = torch.randn_like(ref)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * cot).sum(), (x, w)), torch.autograd.grad((ref * cot).sum(), (x, w))):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda x, w: _RMSNormFn.apply(x, w, 1e-6), (x[:1, :2], w))
    # the module takes the plain path for bf16 (HF's low-precision rounding order)
    m = RMSNorm(16, 1e-6).to(torch.bfloat16)
    xb = x.detach().to(torch.bfloat16)
    assert torch.equal(m(xb), m.weight * (xb.float() * torch.rsqrt(xb.float().pow(2).mean(-1, keepdim=True)
                                                                    + 1e-6)).to(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qk_norm_rope_fn_matches_plain(dtype: torch.dtype) -> None:
    torch.manual_seed(1)
    B, T, P, hd = 2, 6, 3, 8
    x = torch.randn(B, T, P, hd, dtype=dtype, requires_grad=True)
    w = (1 + 0.3 * torch.randn(P, hd, dtype=dtype)).requires_grad_()
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T) * 7, hd, 1e4, dtype)
    got = _QKNormRopeFn.apply(x, w, cos[:, :, None], signed(sin)[:, :, None], 1e-6)
    ref = plain_qk(x, w, cos, sin, 1e-6)
    assert torch.equal(got, ref)  # rotate_half(y)*sin == swap_halves(y)*sin_signed exactly
    cot = torch.randn_like(ref)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad((got * cot).sum(), (x, w)), torch.autograd.grad((ref * cot).sum(), (x, w))):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        c, s = cos[:1, :2, None], signed(sin)[:1, :2, None]
        assert torch.autograd.gradcheck(lambda x, w: _QKNormRopeFn.apply(x, w, c, s, 1e-6), (x[:1, :2], w))


def test_attention_fast_path_equals_plain_modules_fp64() -> None:
    """The fused qkv projection + q/k norm/rotary Function + GQA SDPA equal separate projections, the
    RMSNorm modules, rotate_half and repeated kv heads (outputs and every parameter gradient)."""
    cfg = tiny()
    torch.manual_seed(2)
    att = Attention(cfg, 0).double()
    with torch.no_grad():
        for p in att.parameters():
            p.normal_(1.0 if p.dim() == 1 else 0.0, 0.3)
    B, T, hd = 2, 7, cfg.head_dim
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    cos, sin = rotary_cos_sin(torch.arange(T).expand(B, T), hd, cfg.rope_theta, torch.float64)
    got = att(x, cos, sin, None, None)
    H, Hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    q = plain_rms(att.q_proj(x).view(B, T, H, hd), att.q_norm.weight, cfg.rms_norm_eps)
    k = plain_rms(att.k_proj(x).view(B, T, Hkv, hd), att.k_norm.weight, cfg.rms_norm_eps)
    c, s = cos[:, :, None], sin[:, :, None]
    q, k = (q * c + _rotate_half(q) * s).transpose(1, 2), (k * c + _rotate_half(k) * s).transpose(1, 2)
    v = att.v_proj(x).view(B, T, Hkv, hd).transpose(1, 2)
    o = F.scaled_dot_product_attention(q, k.repeat_interleave(H // Hkv, 1), v.repeat_interleave(H // Hkv, 1),
                                       is_causal=True)
    ref = att.o_proj(o.transpose(1, 2).reshape(B, T, H * hd))
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    params = [x, *att.parameters()]
    cot = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad((got * cot).sum(), params), torch.autograd.grad((ref * cot).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_grouped_experts_gradcheck_with_empty_expert() -> None:
    torch.manual_seed(3)
    N, D, E, K, Fe = 5, 3, 4, 2, 2
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(E, 2 * Fe, D, dtype=torch.float64, requires_grad=True)
    dn = torch.randn(E, D, Fe, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])   # expert E-1 unused
    w = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, gu, dn: grouped_experts(x, idx, w, gu, dn), (x, w, gu, dn))


def test_grouped_experts_under_autocast() -> None:
    """Under CPU autocast the experts compute in bf16 and return x's dtype (fp32), with gradients."""
    torch.manual_seed(4)
    N, D, E, K, Fe = 12, 16, 4, 2, 8
    x = torch.randn(N, D, requires_grad=True)
    gu = (0.3 * torch.randn(E, 2 * Fe, D)).requires_grad_()
    dn = (0.3 * torch.randn(E, D, Fe)).requires_grad_()
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(N)])
    w = torch.rand(N, K, requires_grad=True)
    ref = reference_experts(x, idx, w, gu, dn)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = grouped_experts(x, idx, w, gu, dn)
    assert got.dtype == torch.float32
    assert (got - ref).abs().max() < 0.02 * ref.abs().max()
    got.sum().backward()
    assert x.grad is not None and gu.grad is not None and gu.grad.dtype == torch.float32
    assert torch.isfinite(x.grad).all() and gu.grad.abs().max() > 0


def test_grouped_experts_no_tokens() -> None:
    x = torch.zeros(0, 4, requires_grad=True)
    gu = torch.randn(3, 4, 4, requires_grad=True)
    dn = torch.randn(3, 4, 2, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    y = grouped_experts(x, torch.zeros(0, 2, dtype=torch.long), w, gu, dn)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert gu.grad is not None and gu.grad.abs().max() == 0 and w.grad is not None and w.grad.shape == (0, 2)
