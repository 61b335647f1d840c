"""Token log-probabilities and full-vocabulary entropy from hidden states, chunked over tokens.

The learner computes `log softmax(logits / temperature)` at the sampled tokens (the sampler does the same;
`temperature` = `sampler.temperature`, 1 when sampling greedily). With bf16 (or fp16) hidden states and
weight, the LM head matmul and the softmax run in float32 on upcast operands (no bf16 rounding of the
logits). A `[B, T, V]` logits tensor (plus the softmax for the backward) is the largest activation of an
LLM step, so the LM head runs on `chunk` tokens at a time; with gradients and more than one chunk, each chunk is checkpointed, so
only the hidden states are kept for the backward and one chunk of logits is live at any time.

    logp_BT, ent_BT = chunked_logprobs(hidden_BTD, lm_head.weight, targets_BT, temperature=1.0, chunk=1024,
                                       with_entropy=True)

Legend: B batch, T tokens, D hidden, V vocab, N flattened tokens.
"""

from __future__ import annotations

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
    # One chunk: checkpointing would only add a recompute (the rest of the model's activations are live
    # until the backward anyway), so it is used from two chunks on.
    grad = (torch.is_grad_enabled() and (hidden_BTD.requires_grad or weight_VD.requires_grad)
            and B * T > chunk)
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
    return logp_BT, (torch.cat(ents).view(B, T) if with_entropy else None)
