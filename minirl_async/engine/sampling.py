"""Token sampling for the embedded engine: temperature, top-k, top-p, and the logprob of the sampled token.

One call samples one token for every row of a batch, vectorised; randomness comes in as one uniform number
per row (`u_B`), drawn from that row's own `random.Random(seed)` stream by the engine. Sampling is then the
inverse CDF of the row's (truncated, renormalised) distribution at `u`. Every decision is per row (whether
to truncate, the CDF, the clamp), so a row's distribution does not depend on what else is in the batch.

The distribution sampled from is `q = p / Z`: `p = softmax(logits / T)` over the full vocabulary, zeroed
outside the row's top-k and top-p nucleus, `Z` the kept mass (`q = p`, `Z = 1` for a row without
truncation: top_p = 1 and top_k = 0 or >= V). The logprob returned is `log q[token] = log p[token] - log Z`,
the log-probability of the token under the distribution it was actually drawn from: the learner's
train-inference weight `d = pi_prox / mu` (ALGORITHM.md section 3) is an importance weight for samples of
`mu`, so `mu` must be the sampling distribution. Recording the untruncated `log p` instead would make every
`d` of a truncated row off by the factor `Z`. Greedy rows (T = 0) return the argmax and
`log_softmax(logits)[argmax]` (T = 1, no truncation: the argmax survives any truncation).

Numerics: the log-softmax and its exp run in float32 (float64 for float64 logits); the CDF, the truncation
and the target `u * Z` in float64, so no token outside the kept set can be hit through rounding (`u` is never
rounded to 1, and a target that still reaches the end is clamped to the row's last token with positive mass).

    tok_B, logp_B = sample_tokens(logits_BV, temperature_B, top_p_B, top_k_B, u_B)

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch


def sample_tokens(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor,
                  top_k_B: torch.Tensor, u_B: torch.Tensor, *,
                  plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. temperature 0 = greedy (argmax). top_p 1 / top_k 0 = off. `u_B` uniforms in
    [0, 1) (float64 keeps their full precision). Returns `(tokens int64 [B], logprobs float32 [B])`, the
    logprob under the (truncated, renormalised) distribution the token was drawn from.

    `plain=True` is the caller's promise that no row is greedy or truncated (temperature > 0, top_p >= 1,
    top_k 0 or >= V): the same numbers, about half the ops (the per-step cost of the engine's sampling)."""
    B, V = logits_BV.shape
    cdt = torch.float64 if logits_BV.dtype == torch.float64 else torch.float32
    logits = logits_BV.to(cdt)
    greedy_B = None if plain else temperature_B <= 0
    t_eff_B = temperature_B if greedy_B is None else torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B)
    logp_BV = torch.log_softmax(logits / t_eff_B.to(cdt)[:, None], dim=-1)

    probs_BV = logp_BV.exp().to(torch.float64)   # exp in the compute dtype (float64 exp is ~3x slower on CPU)
    trunc_B = None
    if greedy_B is not None:
        trunc_B = ~greedy_B & (((top_k_B > 0) & (top_k_B < V)) | (top_p_B < 1))
        if bool(trunc_B.any()):
            rows = trunc_B.nonzero().squeeze(1)
            probs_BV = probs_BV.index_copy(0, rows, _truncate(probs_BV[rows], top_p_B[rows].to(torch.float64),
                                                             top_k_B[rows]))
    cdf_BV = probs_BV.cumsum(dim=-1)
    total_B = cdf_BV[:, -1]
    target_B = u_B.to(torch.float64) * total_B
    sampled_B = torch.searchsorted(cdf_BV, target_B[:, None], right=True).squeeze(1)
    # searchsorted(right=True) returns the first token whose CDF exceeds the target: a token with positive
    # mass (zero-mass tokens are flat CDF steps). Only a target that reaches the total (u * Z rounded up)
    # lands past the end: it is clamped to the row's last token with positive mass.
    over_B = sampled_B >= V
    if bool(over_B.any()):
        last_pos_B = V - 1 - (probs_BV > 0).flip(-1).to(torch.uint8).argmax(dim=-1)
        sampled_B = torch.where(over_B, last_pos_B, sampled_B)
    if greedy_B is None or trunc_B is None:   # plain: no greedy row, no truncation (log Z = 0)
        return sampled_B, logp_BV.gather(1, sampled_B[:, None]).squeeze(1).float()
    tokens_B = torch.where(greedy_B, logits.argmax(dim=-1), sampled_B) if bool(greedy_B.any()) else sampled_B
    logp_B = logp_BV.gather(1, tokens_B[:, None]).squeeze(1).to(torch.float64)
    logp_B = torch.where(trunc_B, logp_B - total_B.log(), logp_B)   # log q = log p - log Z
    return tokens_B, logp_B.float()


def _truncate(probs_BV: torch.Tensor, top_p_B: torch.Tensor, top_k_B: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside top-k and outside the top-p nucleus (the smallest set of most likely tokens
    whose mass reaches top_p; the token that crosses top_p is kept; top_p = 1 keeps every token). Not
    renormalised: the caller's CDF sampling scales by the row total."""
    V = probs_BV.shape[1]
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=probs_BV.device)
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
    keep_BV = rank_V[None, :] < k_B[:, None]
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    # top_p = 1 is off (a rounded cumulative mass can reach 1 before the tail: the tail must stay)
    keep_BV &= (mass_before_BV < top_p_B[:, None]) | (top_p_B[:, None] >= 1)
    keep_BV[:, 0] = True  # the most likely token always survives
    kept_sorted_BV = torch.where(keep_BV, sorted_BV, torch.zeros_like(sorted_BV))
    return torch.zeros_like(probs_BV).scatter_(1, order_BV, kept_sorted_BV)
