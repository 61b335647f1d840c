"""Token log-probabilities and full-vocabulary entropy from hidden states, chunked over tokens.

The learner computes `log softmax(logits / temperature)` at the sampled tokens (the sampler does the same;
`temperature` = `sampler.temperature`, 1 when sampling greedily). With bf16 (or fp16) hidden states and
weight, the LM head matmul and the softmax run in float32 on upcast operands (no bf16 rounding of the
logits). A `[B, T, V]` logits tensor (plus the softmax for the backward) is the largest activation of an
LLM step, so the LM head runs on `chunk` tokens at a time. With gradients, `_LogprobFn` keeps only the hidden
states and `logsumexp` per token for the backward, which recomputes one chunk of logits at a time and writes
`d logp / d logits = onehot - softmax` in place (one matmul and ~4 kernels per chunk, where checkpointing
plus autograd re-ran the whole forward and ~10 kernels of log-softmax/gather backward). The entropy with
gradients (not used by the learner: it is a no-grad metric) keeps the checkpointed autograd path.

    logp_BT, ent_BT = chunked_logprobs(hidden_BTD, lm_head.weight, targets_BT, temperature=1.0, chunk=1024,
                                       with_entropy=True)

Legend: B batch, T tokens, D hidden, V vocab, N flattened tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint


def _chunk_fn(h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, inv_temp: float,
              with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # LM head and softmax in at least float32 whatever the compute dtype: bf16 logits lose ~3 digits, which
    # would add the learner's own rounding to the train-inference gap. The bf16 hidden and weight are exact
    # in fp32, so upcasting them (one chunk at a time: the fp32 weight copy is transient) gives the exact
    # products of the bf16 operands; fp64 stays fp64.
    if h_ND.dtype not in (torch.float32, torch.float64):
        h_ND, w_VD = h_ND.float(), w_VD.float()
    logits_NV = torch.nn.functional.linear(h_ND, w_VD) * inv_temp
    logz_N = torch.logsumexp(logits_NV, dim=-1)
    logp_N = logits_NV.gather(-1, y_N[:, None]).squeeze(-1) - logz_N
    if with_entropy:
        p_NV = torch.exp(logits_NV - logz_N[:, None])
        ent_N = logz_N - (p_NV * logits_NV).sum(-1)
    else:
        ent_N = logp_N.new_zeros(0)
    return logp_N, ent_N


def _logits(h_ND: torch.Tensor, w_VD: torch.Tensor, inv_temp: float) -> torch.Tensor:
    """One chunk of logits in at least float32 (see `_chunk_fn`); the same ops and roundings."""
    if h_ND.dtype not in (torch.float32, torch.float64):
        h_ND, w_VD = h_ND.float(), w_VD.float()
    logits_NV = torch.nn.functional.linear(h_ND, w_VD)
    return logits_NV if inv_temp == 1.0 else logits_NV.mul_(inv_temp)   # x * 1.0 == x: skipped


class _LogprobFn(torch.autograd.Function):
    """`log softmax(h @ w.T * inv_temp)` at the targets, chunked over tokens, with a written-out backward:
    d logp_n / d logits_n = onehot(y_n) - softmax_n, so per chunk
    `G = inv_temp * g[:, None] * (onehot - p)`, `dh = G @ w`, `dw += G.T @ h` (p from the recomputed logits
    and the saved logsumexp). The forward is `_chunk_fn`'s (bit-identical log-probs)."""

    @staticmethod
    def forward(ctx: Any, h_ND: torch.Tensor, w_VD: torch.Tensor, y_N: torch.Tensor, inv_temp: float,
                chunk: int, out_shape: tuple[int, ...]) -> torch.Tensor:
        N = h_ND.shape[0]
        cdt = torch.float64 if h_ND.dtype == torch.float64 else torch.float32
        logp, logz_N = h_ND.new_empty(out_shape, dtype=cdt), h_ND.new_empty(N, dtype=cdt)
        logp_N = logp.view(N)
        w_c = w_VD.to(cdt)   # once, not per chunk (a bf16 LM head of a 150k vocabulary is ~1 GB in float32)
        for s in range(0, N, chunk):
            logits_NV = _logits(h_ND[s:s + chunk], w_c, inv_temp)
            lz_N = torch.logsumexp(logits_NV, dim=-1, out=logz_N[s:s + chunk])
            torch.sub(logits_NV.gather(-1, y_N[s:s + chunk, None]).squeeze(-1), lz_N, out=logp_N[s:s + chunk])
        ctx.save_for_backward(h_ND, w_VD, y_N, logz_N)
        ctx.inv_temp, ctx.chunk = inv_temp, chunk
        return logp   # shaped here, not a view of the output (FSDP2 warns about modules returning views)

    @staticmethod
    def backward(ctx: Any, g_N: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        h_ND, w_VD, y_N, logz_N = ctx.saved_tensors
        inv_temp, chunk = ctx.inv_temp, ctx.chunk
        need_h, need_w = ctx.needs_input_grad[:2]
        cdt = logz_N.dtype
        w_c = w_VD.to(cdt)
        gh_ND = torch.empty_like(h_ND, dtype=cdt) if need_h else None
        gw_VD = torch.zeros_like(w_VD, dtype=cdt) if need_w else None
        g_N = g_N.reshape(-1).to(cdt)
        for s in range(0, h_ND.shape[0], chunk):
            h_c = h_ND[s:s + chunk].to(cdt)
            # p = softmax, then G = -g * p, G[n, y_n] += g_n, times inv_temp (the chain rule of the scaling)
            G_NV = _logits(h_c, w_c, inv_temp).sub_(logz_N[s:s + chunk, None]).exp_()
            g_c = g_N[s:s + chunk, None]
            G_NV.mul_(-g_c).scatter_add_(1, y_N[s:s + chunk, None], g_c)
            if inv_temp != 1.0:
                G_NV.mul_(inv_temp)
            if gh_ND is not None:
                torch.mm(G_NV, w_c, out=gh_ND[s:s + chunk])
            if gw_VD is not None:
                gw_VD.addmm_(G_NV.t(), h_c)
        return (gh_ND.to(h_ND.dtype) if gh_ND is not None else None,
                gw_VD.to(w_VD.dtype) if gw_VD is not None else None, None, None, None, None)


def chunked_logprobs(hidden_BTD: torch.Tensor, weight_VD: torch.Tensor, targets_BT: torch.Tensor,
                     temperature: float = 1.0, chunk: int = 1024,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`log p(targets)` `[B, T]` under `softmax(hidden @ weight.T / temperature)` and, if asked, the
    full-vocabulary entropy `[B, T]` (no gradient needed for it; it is returned detached only if the
    inputs do not require grad). Differentiable in `hidden` and `weight`."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 (use 1.0 for greedy sampling), got {temperature}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    B, T, D = hidden_BTD.shape
    h_ND = hidden_BTD.reshape(B * T, D)
    y_N = targets_BT.reshape(B * T).long()
    inv_temp = 1.0 / temperature
    needs_grad = torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad)
    if needs_grad and not with_entropy:
        return _LogprobFn.apply(h_ND, weight_VD, y_N, inv_temp, chunk, (B, T)), None
    # One chunk: checkpointing would only add a recompute (the rest of the model's activations are live
    # until the backward anyway), so it is used from two chunks on.
    grad = needs_grad and B * T > chunk
    lps, ents = [], []
    for s in range(0, B * T, chunk):
        args = (h_ND[s:s + chunk], weight_VD, y_N[s:s + chunk], inv_temp, with_entropy)
        if grad:
            lp_N, ent_N = checkpoint(_chunk_fn, *args, use_reentrant=False)
        else:
            lp_N, ent_N = _chunk_fn(*args)
        lps.append(lp_N)
        ents.append(ent_N)
    logp_BT = torch.cat(lps).view(B, T)
    ent_BT = torch.cat(ents).view(B, T) if with_entropy else None
    if needs_grad:   # not views of the flat results (FSDP2 warns about modules returning views); B*T floats
        logp_BT, ent_BT = logp_BT.clone(), ent_BT.clone() if ent_BT is not None else None
    return logp_BT, ent_BT
