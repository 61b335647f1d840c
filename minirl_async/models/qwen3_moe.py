"""Qwen3-MoE causal LM in plain PyTorch, numerically the same as transformers' `Qwen3MoeForCausalLM`.

Architecture only: FSDP wrapping, compile, KV-cache storage and routing transport come from outside through
explicit arguments (`routing`, `kv_cache`, `attn_mask`, `position_ids`). Parameter names follow HF's
in-memory naming, so `state_dict()` keys equal HF's (transformers 5.x stores experts stacked, like us):

    model.embed_tokens.weight                         [V, D]
    model.layers.{i}.input_layernorm.weight           [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [H*hd, D], [Hkv*hd, D], [Hkv*hd, D], [D, H*hd]
    model.layers.{i}.self_attn.{q,k}_norm.weight      [hd]
    model.layers.{i}.post_attention_layernorm.weight  [D]
    MoE layer:   model.layers.{i}.mlp.gate.weight              [E, D]      router
                 model.layers.{i}.mlp.experts.gate_up_proj     [E, 2F, D]  rows 0..F-1 gate, F..2F-1 up
                 model.layers.{i}.mlp.experts.down_proj        [E, D, F]
    dense layer: model.layers.{i}.mlp.{gate,up}_proj.weight    [I, D];  mlp.down_proj.weight [D, I]
    model.norm.weight [D];  lm_head.weight [V, D] (the same Parameter as embed_tokens when tied)

On disk (hf_io.py) experts are split per expert: `mlp.experts.{j}.{gate,up,down}_proj.weight`.
Any dtype works: `model.to(torch.bfloat16)`; norms, rotary and the router softmax run in float32 (float64
when the model is float64), as HF does.

Speed (a small model's CPU train step is bound by elementwise kernels and memory traffic as much as by its
matmuls): the grouped experts, RMSNorm and the per-head q/k norm + rotary have hand-written backward
passes (`torch.autograd.Function`), fp64-tested against plain autograd in tests/models/test_fast_paths.py;
q, k and v come from one matmul on the concatenated weights; causal self-attention lets SDPA read the kv
heads in place (`enable_gqa`). The forwards keep the plain code's op order (fp32 logits of the default
architecture were bit-identical to the plain per-module code when this was written). Measured by
`minirl-async bench learner`. Tried (one-layer fwd+bwd, CPU ms, min/median of interleaved runs): q/k/v made
head-major contiguous for SDPA 13.5 vs 13.1 (no gain); SDPA with repeated kv heads 9.6 vs 9.4 (GQA) and the
math backend 12.4; `_CHUNK_ELEMS` 32K/8K/unchunked 186/246/210 vs 185 (whole-model fwd+bwd); SiLU written
into the expert scratch buffer (no temporary) 20.1 vs 20.0 per MoE layer. A hand-written causal GQA attention
Function (queries blocked by 32 so each block multiplies only the keys it sees, P saved for backward; fp64
gradcheck-exact) vs SDPA, fwd+bwd of one layer's attention in fp32: 9.7 vs 11.8 ms at B16 T128 (1.2x; 1.5x
only at T512), i.e. ~3% of an update here: not worth 60 lines of autograd code (2026-12).

Legend: B batch, T query tokens, S key tokens (cache + new), D hidden, H query heads, Hkv kv heads,
hd head dim, V vocab, E experts, K top-k, F expert FFN width, I dense FFN width, N flattened tokens (B*T),
L MoE layers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from minirl_async.models.config import ModelConfig
from minirl_async.models.routing import Routing, replay_gates, router_probs, routes_dtype


class KVCache(Protocol):
    """What the model needs from a cache; the engine owns the storage. `update` appends the new keys and
    values of layer `layer_idx` and returns all keys/values the new queries may attend to."""

    def update(self, layer_idx: int, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fast_path(x: torch.Tensor) -> bool:
    """float32/float64 tensors take the hand-written autograd paths below; other dtypes (bf16 models,
    autocast) take the plain module code, which reproduces HF's order of roundings in low precision."""
    return x.dtype in (torch.float32, torch.float64)


_CHUNK_ELEMS = 4096 * 32
"""Elements per chunk of the written-out elementwise chains: each chunk's chain of ~10 kernels then runs
on data still in L2 (a 1.5 MB tensor streamed by every kernel runs several times slower here)."""


def _row_chunks(n_rows: int, row_elems: int) -> list[slice]:
    step = max(1, _CHUNK_ELEMS // max(1, row_elems))
    return [slice(i, i + step) for i in range(0, n_rows, step)]


class _RMSNormFn(torch.autograd.Function):
    """`w * (x * rsqrt(mean(x^2) + eps))` over the last dim, float32/float64 only. The forward is the same op
    sequence as the plain code (bit-identical); the backward is written out (~7 kernels instead of
    autograd's ~12), both chunked over rows so that each chain runs in cache."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        out, xhat, rstd = torch.empty_like(x2), torch.empty_like(x2), x2.new_empty(x2.shape[0], 1)
        for c in _row_chunks(x2.shape[0], x2.shape[1]):
            r = torch.rsqrt(x2[c].pow(2).mean(-1, keepdim=True) + eps, out=rstd[c])
            torch.mul(w, torch.mul(x2[c], r, out=xhat[c]), out=out[c])
        ctx.save_for_backward(xhat, rstd, w)
        return out.view(x.shape)

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, rstd, w = ctx.saved_tensors
        g2 = g.reshape(xhat.shape)
        gx = torch.empty_like(xhat)
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for c in _row_chunks(xhat.shape[0], xhat.shape[1]):
            g_c, xh = g2[c], xhat[c]
            if gw is not None:
                gw += (g_c * xh).sum(0)
            gxhat = g_c * w
            # d/dx of x*rstd: rstd * (gxhat - xhat * mean(gxhat * xhat))
            dot = (gxhat * xh).mean(-1, keepdim=True)
            torch.addcmul(gxhat, xh, dot, value=-1.0, out=gx[c]).mul_(rstd[c])
        return gx.view(g.shape), gw, None


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fast_path(x) and self.weight.dtype == x.dtype:
            return _RMSNormFn.apply(x, self.weight, self.eps)
        # Normalise in float32 and cast back before the weight multiply: exactly HF's order of roundings.
        h = x.to(_compute_dtype(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, T, hd]` for the given positions. Computed on the fly (no buffer) so that
    `model.to(bfloat16)` cannot round the frequencies; float32 like HF (float64 for float64 models)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    dev = position_ids_BT.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=dev) / head_dim))
    freqs_BTh = position_ids_BT[..., None].to(cdt) * inv_freq.to(cdt)
    emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _swap_halves(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x2, x1), dim=-1)


class _QKNormRopeFn(torch.autograd.Function):
    """Per-head RMSNorm of the q and k heads together, then rotary: float32/float64 only.

    x `[B, T, P, hd]` (P = H + Hkv heads: q heads then k heads, a view of the fused qkv projection), weight
    `[P, hd]` (q_norm's weight repeated H times, then k_norm's Hkv times), cos/sin `[B, T, 1, hd]`.
    `rotate_half(y) * sin == swap_halves(y) * sin_signed` exactly (sin_signed = sin with its first half
    negated: the same products up to sign), so the forward rounds exactly like HF's
    `y * cos + rotate_half(y) * sin`. Written out so that q and k go through one short chain of kernels,
    chunked over the batch so that each chain runs in cache."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor,
                eps: float) -> torch.Tensor:
        B, T, P, hd = x.shape
        out, xhat, rstd = x.new_empty(B, T, P, hd), x.new_empty(B, T, P, hd), x.new_empty(B, T, P, 1)
        cos, sin_signed = cos.expand(B, T, 1, hd), sin_signed.expand(B, T, 1, hd)
        for c in _row_chunks(B, T * P * hd):
            r = torch.rsqrt(x[c].pow(2).mean(-1, keepdim=True) + eps, out=rstd[c])
            y = w * torch.mul(x[c], r, out=xhat[c])
            torch.mul(y, cos[c], out=out[c]).add_(_swap_halves(y).mul_(sin_signed[c]))  # no addcmul: no FMA
        ctx.save_for_backward(xhat, rstd, w, cos, sin_signed)
        return out

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, rstd, w, cos, sin_signed = ctx.saved_tensors
        B, T, P, hd = xhat.shape
        gx = xhat.new_empty(B, T, P, hd)
        gw = torch.zeros_like(w) if ctx.needs_input_grad[1] else None
        for c in _row_chunks(B, T * P * hd):
            # out = y*cos + swap(y)*s  =>  dy = g*cos + swap(g*s) = g*cos - swap(g)*s  (swap(s) = -s)
            g_c, xh = g[c], xhat[c]
            gy = torch.addcmul(g_c * cos[c], _swap_halves(g_c), sin_signed[c], value=-1.0)
            if gw is not None:
                gw += (gy * xh).reshape(-1, P, hd).sum(0)
            gxhat = gy.mul_(w)
            dot = (gxhat * xh).mean(-1, keepdim=True)
            torch.addcmul(gxhat, xh, dot, value=-1.0, out=gx[c]).mul_(rstd[c])
        return gx, gw, None, None, None


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # Qwen3: per-head RMSNorm of q and k before rotary
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor,
                attn_mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        H, Hkv, hd = self.num_heads, self.num_kv_heads, self.head_dim
        # One matmul for q, k and v (the weight concat is tiny next to the activations); autograd's concat
        # backward hands each projection its rows of the fused weight gradient.
        w_qkv = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        qk_BTX, v_BTX = F.linear(x_BTD, w_qkv).split(((H + Hkv) * hd, Hkv * hd), dim=-1)
        cos, sin = cos_BTd[:, :, None], sin_BTd[:, :, None]
        qk_BTPd = qk_BTX.view(B, T, H + Hkv, hd)
        if _fast_path(qk_BTPd) and self.q_norm.weight.dtype == qk_BTPd.dtype:
            w_Pd = torch.cat((self.q_norm.weight.expand(H, hd), self.k_norm.weight.expand(Hkv, hd)))
            sign_d = torch.ones(hd, dtype=sin.dtype, device=sin.device)
            sign_d[: hd // 2] = -1.0
            qk_BTPd = _QKNormRopeFn.apply(qk_BTPd, w_Pd, cos, sin * sign_d, self.q_norm.eps)
            q_BTHd, k_BTHd = qk_BTPd.split((H, Hkv), dim=2)
        else:
            q_BTHd, k_BTHd = qk_BTPd.split((H, Hkv), dim=2)
            q_BTHd, k_BTHd = self.q_norm(q_BTHd), self.k_norm(k_BTHd)
            q_BTHd = q_BTHd * cos + _rotate_half(q_BTHd) * sin
            k_BTHd = k_BTHd * cos + _rotate_half(k_BTHd) * sin
        q_BHTd, k_BHTd = q_BTHd.transpose(1, 2), k_BTHd.transpose(1, 2)
        v_BHTd = v_BTX.view(B, T, Hkv, hd).transpose(1, 2)
        if kv_cache is not None:
            k_BHSd, v_BHSd = kv_cache.update(self.layer_idx, k_BHTd, v_BHTd)
        else:
            k_BHSd, v_BHSd = k_BHTd, v_BHTd
        S = k_BHSd.shape[2]
        rep = H // Hkv
        if attn_mask is None and S == T:
            # Plain causal self-attention (training): SDPA reads the kv heads in place (no repeat copies).
            o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, is_causal=True, enable_gqa=rep > 1)
        else:
            if attn_mask is None and T > 1:
                # Cached prefix + T new tokens: causal aligned to the bottom right (new token i sees S-T+i).
                q_pos = torch.arange(S - T, S, device=x_BTD.device)
                attn_mask = (torch.arange(S, device=x_BTD.device)[None, :] <= q_pos[:, None])[None, None]
            # Repeat kv heads ourselves: SDPA's enable_gqa does not cover every backend/mask combination.
            if rep > 1:
                k_BHSd = k_BHSd.repeat_interleave(rep, dim=1)
                v_BHSd = v_BHSd.repeat_interleave(rep, dim=1)
            o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=attn_mask)
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, H * hd))


class MLP(nn.Module):
    """Dense SwiGLU FFN (non-MoE layers)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(x, torch.cat((self.gate_proj.weight, self.up_proj.weight))).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class _GroupedExpertsFn(torch.autograd.Function):
    """Forward and backward of `grouped_experts` written out, one expert at a time.

    A small model's CPU step is bound by the memory traffic of elementwise kernels more than by its
    matmuls, so each expert's rows go through gather, gate/up matmul, SiLU*up, down matmul, routing weight
    and scatter-add while they are in cache (per-expert scratch buffers, reused); only the gate/up
    pre-activations `h` are saved (SiLU*up is recomputed in the backward, the expert outputs are not
    needed: d/dw = (g @ down) . act). The weight gradients are written straight into their `[E, ...]`
    buffers (autograd through `w[e]` would allocate and add a full-size zero gradient per expert). Per-expert
    views come from one `split`/`unbind` each, outside the loops (Python dispatch is a visible cost here).
    M = N*K (token, k) rows, sorted by expert; n rows of one expert."""

    @staticmethod
    def forward(ctx: Any, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> torch.Tensor:
        N, K = idx_NK.shape
        E, F2, D = gate_up_EFD.shape
        Fe = F2 // 2
        flat_M = idx_NK.reshape(-1)
        order_M = torch.argsort(flat_M, stable=True)      # (token, k) pairs grouped by expert
        token_M = order_M // K
        w_M1 = w_NK.reshape(-1).index_select(0, order_M).unsqueeze(1)
        counts = torch.bincount(flat_M, minlength=E).tolist()
        h_MF2 = x_ND.new_empty(N * K, F2)
        rows = max(counts)
        x_buf, act_buf, y_buf = x_ND.new_empty(rows, D), x_ND.new_empty(rows, Fe), x_ND.new_empty(rows, D)
        out_ND = torch.zeros_like(x_ND)
        per_expert = zip(counts, token_M.split(counts), w_M1.split(counts), h_MF2.split(counts),
                         gate_up_EFD.transpose(1, 2).unbind(0), down_EDF.transpose(1, 2).unbind(0))
        for n, tok_n, w_n1, h_nF2, gu_DF2, dn_FD in per_expert:
            if n:
                torch.mm(torch.index_select(x_ND, 0, tok_n, out=x_buf[:n]), gu_DF2, out=h_nF2)
                act_nF = torch.mul(F.silu(h_nF2[:, :Fe]), h_nF2[:, Fe:], out=act_buf[:n])
                out_ND.index_add_(0, tok_n, torch.mm(act_nF, dn_FD, out=y_buf[:n]).mul_(w_n1))
        ctx.save_for_backward(x_ND, h_MF2, w_M1, order_M, token_M, gate_up_EFD, down_EDF)
        ctx.counts, ctx.K = counts, K
        return out_ND

    @staticmethod
    def backward(ctx: Any, g_ND: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x_ND, h_MF2, w_M1, order_M, token_M, gate_up_EFD, down_EDF = ctx.saved_tensors
        counts: list[int] = ctx.counts
        N, D = x_ND.shape
        M, F2 = h_MF2.shape
        Fe = F2 // 2
        g_ND = g_ND.contiguous()
        # experts that received no token get an exact zero gradient
        zeros_or_empty = torch.zeros_like if 0 in counts else torch.empty_like
        g_dn, g_gu = zeros_or_empty(down_EDF), zeros_or_empty(gate_up_EFD)
        gx_ND, gw_M = torch.zeros_like(x_ND), x_ND.new_empty(M)
        rows = max(counts)
        new = x_ND.new_empty
        x_buf, g_buf, sg_buf, act_buf, gact_buf, gh_buf, gx_buf = (
            new(rows, D), new(rows, D), new(rows, Fe), new(rows, Fe), new(rows, Fe), new(rows, F2), new(rows, D))
        per_expert = zip(counts, token_M.split(counts), w_M1.split(counts), h_MF2[:, :Fe].split(counts),
                         h_MF2[:, Fe:].split(counts), gw_M.split(counts), gate_up_EFD.unbind(0),
                         down_EDF.unbind(0), g_gu.unbind(0), g_dn.unbind(0))
        for n, tok_n, w_n1, gate_nF, up_nF, gw_n, gu_F2D, dn_DF, g_gu_F2D, g_dn_DF in per_expert:
            if not n:
                continue
            sg_nF = torch.ops.aten.silu.out(gate_nF, out=sg_buf[:n])
            act_nF = torch.mul(sg_nF, up_nF, out=act_buf[:n])
            g_nD = torch.index_select(g_ND, 0, tok_n, out=g_buf[:n])
            gact_nF = torch.mm(g_nD, dn_DF, out=gact_buf[:n])                    # d act, before the weight
            g_nD.mul_(w_n1)                                                       # d y
            torch.mm(g_nD.t(), act_nF, out=g_dn_DF)
            torch.sum(act_nF.mul_(gact_nF), -1, out=gw_n)                         # d w = (g @ down) . act
            gact_nF.mul_(w_n1)
            gh_nF2 = gh_buf[:n]
            torch.mul(gact_nF, sg_nF, out=gh_nF2[:, Fe:])                                          # d up
            torch.ops.aten.silu_backward.grad_input(gact_nF.mul_(up_nF), gate_nF, grad_input=gh_nF2[:, :Fe])
            torch.mm(gh_nF2.t(), torch.index_select(x_ND, 0, tok_n, out=x_buf[:n]), out=g_gu_F2D)
            gx_ND.index_add_(0, tok_n, torch.mm(gh_nF2, gu_F2D, out=gx_buf[:n]))
        gw_NK = torch.empty_like(gw_M).index_copy_(0, order_M, gw_M).view(N, ctx.K)
        return gx_ND, None, gw_NK, g_gu, g_dn


def grouped_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> torch.Tensor:
    """sum_k w[n,k] * expert_{idx[n,k]}(x[n]) with the (token, k) pairs sorted by expert, so each expert
    runs one matmul on its contiguous slice (the loop is over experts, never over tokens).
    `gate_up_EFD` is `[E, 2F, D]` (gate rows then up rows), `down_EDF` is `[E, D, F]`. The result has
    `x_ND`'s dtype; under `torch.autocast` the experts compute in the autocast dtype (as `F.linear` would)."""
    dev = x_ND.device.type
    if torch.is_autocast_enabled(dev):
        cdt = torch.get_autocast_dtype(dev)
        with torch.autocast(dev, enabled=False):
            y_ND = _GroupedExpertsFn.apply(x_ND.to(cdt), idx_NK, w_NK.to(cdt), gate_up_EFD.to(cdt),
                                           down_EDF.to(cdt))
        return y_ND.to(x_ND.dtype)
    cdt = torch.promote_types(x_ND.dtype, gate_up_EFD.dtype)
    y_ND = _GroupedExpertsFn.apply(x_ND.to(cdt), idx_NK, w_NK.to(cdt), gate_up_EFD.to(cdt), down_EDF.to(cdt))
    return y_ND.to(x_ND.dtype)


class Experts(nn.Module):
    """The E routed experts of one layer as stacked parameters (HF transformers-5 in-memory layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, Fe = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fe, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fe))

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x_ND, idx_NK, w_NK, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # router, HF name `mlp.gate`
        self.experts = Experts(cfg)

    def forward(self, x_BTD: torch.Tensor,
                replay_BTK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the expert indices used `[B, T, K]` (int64)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        probs_NE = router_probs(self.gate(x_ND))
        if replay_BTK is None:
            idx_NK = torch.topk(probs_NE, self.top_k, dim=-1).indices
        else:
            idx_NK = replay_BTK.reshape(B * T, self.top_k)
        w_NK = replay_gates(probs_NE, idx_NK, self.norm_topk_prob).to(x_BTD.dtype)
        y_ND = self.experts(x_ND, idx_NK, w_NK)
        return y_ND.view(B, T, D), idx_NK.view(B, T, self.top_k)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp: nn.Module = SparseMoeBlock(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                replay_BTK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new residual stream and, for MoE layers, the expert indices used `[B, T, K]`."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTd, sin_BTd, attn_mask, kv_cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            y_BTD, idx_BTK = self.mlp(h_BTD, replay_BTK)
            return x_BTD + y_BTD, idx_BTK
        return x_BTD + self.mlp(h_BTD), None


class Qwen3MoeModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3MoeModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's initialisation: normal(0, initializer_range) for every matrix, ones for norms, zero pad row.
        Call again after materialising a meta-device model."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        if self.config.pad_token_id is not None:
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def forward_hidden(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                       routing: Routing | None = None, kv_cache: Any | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states `[B, T, D]`. See `forward` for the arguments."""
        cfg = self.config
        B, T = input_ids_BT.shape
        if position_ids_BT is None:
            if kv_cache is not None:
                raise ValueError("position_ids_BT is required with a kv_cache (the model cannot know the "
                                 "cache length); pass the absolute positions of the new tokens")
            position_ids_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        x_BTD = self.model.embed_tokens(input_ids_BT)
        cos_BTd, sin_BTd = rotary_cos_sin(position_ids_BT, cfg.head_dim, cfg.rope_theta, x_BTD.dtype)
        mode = routing.mode if routing is not None else "free"
        replay_BTLK = None
        if mode == "replay":
            assert routing is not None
            replay_BTLK = routing.check_replay(B, T, cfg.num_moe_layers, cfg.num_experts_per_tok,
                                               cfg.num_experts).to(input_ids_BT.device)
        recorded: list[torch.Tensor] = []
        moe_slot = 0
        for layer in self.model.layers:
            replay_BTK = None
            if replay_BTLK is not None and layer.is_moe:
                replay_BTK = replay_BTLK[:, :, moe_slot]
            x_BTD, idx_BTK = layer(x_BTD, cos_BTd, sin_BTd, attn_mask, kv_cache, replay_BTK)
            if idx_BTK is not None:
                moe_slot += 1
                if mode == "record":
                    recorded.append(idx_BTK)
        if mode == "record":
            assert routing is not None
            rdt = routes_dtype(max(cfg.num_experts, 1))
            routing.recorded_BTLK = (torch.stack(recorded, dim=2).to(rdt) if recorded
                                     else torch.zeros(B, T, 0, cfg.num_experts_per_tok, dtype=rdt))
        return self.model.norm(x_BTD)

    def forward(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                routing: Routing | None = None, kv_cache: Any | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, V]`.

        position_ids_BT: absolute positions (default 0..T-1; required with `kv_cache`).
        routing: router mode (`Routing`); None = free routing.
        kv_cache: object with `update(layer_idx, k_BHTd, v_BHTd) -> (k_BHSd, v_BHSd)`.
        attn_mask: bool `[B, 1, T, S]` (True = may attend) or an additive float mask; None = causal
            (aligned to the end of the cache when a cache is given). A query row that may attend to nothing
            gives NaN (SDPA semantics): let padding rows attend at least to themselves.
        """
        return self.lm_head(self.forward_hidden(input_ids_BT, position_ids_BT, routing, kv_cache, attn_mask))
