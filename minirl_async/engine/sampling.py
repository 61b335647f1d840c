"""Token sampling for the embedded engine: temperature, top-k, top-p, and the logprob the learner recomputes.

One call samples one token for every row of a batch, vectorised; randomness comes in as one uniform number
per row (`u_B`), drawn from that row's own `random.Random(seed)` stream by the engine. Sampling is then the
inverse CDF of the row's (truncated, renormalised) distribution at `u`, so a seeded request draws the same
tokens whatever else is in the batch: nothing random depends on the batch composition or on a shared
generator's position.

The logprob returned is `log_softmax(logits / T)[token]` over the FULL vocabulary, before top-k/top-p
truncation, with T = 1 for greedy rows: exactly what the learner computes from its own logits
(ALGORITHM.md section 1, `mu_old`). With the defaults top_p = 1, top_k = 0 this is also the distribution
sampled from; with truncation the sampled distribution is the renormalised truncated one, and the
difference is deliberate (the learner cannot recompute a truncation it does not apply).

    tok_B, logp_B = sample_tokens(logits_BV, temperature_B, top_p_B, top_k_B, u_B)

Legend: B rows, V vocabulary.
"""

from __future__ import annotations

import torch


def sample_tokens(logits_BV: torch.Tensor, temperature_B: torch.Tensor, top_p_B: torch.Tensor,
                  top_k_B: torch.Tensor, u_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per row. temperature 0 = greedy (argmax). top_p 1 / top_k 0 = off.
    Returns `(tokens int64 [B], logprobs float32 [B])`."""
    B, V = logits_BV.shape
    cdt = torch.float64 if logits_BV.dtype == torch.float64 else torch.float32
    logits = logits_BV.to(cdt)
    greedy_B = temperature_B <= 0
    t_eff_B = torch.where(greedy_B, torch.ones_like(temperature_B), temperature_B).to(cdt)
    logp_BV = torch.log_softmax(logits / t_eff_B[:, None], dim=-1)

    probs_BV = logp_BV.exp()
    truncate = bool(((top_k_B > 0) & (top_k_B < V)).any()) or bool((top_p_B < 1).any())
    if truncate:
        probs_BV = _truncate(probs_BV, top_p_B.to(cdt), top_k_B)
    cdf_BV = probs_BV.cumsum(dim=-1)
    target_B = u_B.to(cdt) * cdf_BV[:, -1]
    sampled_B = torch.searchsorted(cdf_BV, target_B[:, None], right=True).squeeze(1).clamp_(max=V - 1)
    # Zero-probability tokens can never be returned: searchsorted(right=True) skips flat CDF steps, except
    # at u*total == cdf exactly on a plateau end, where it lands on the next positive-mass token.
    tokens_B = torch.where(greedy_B, logits.argmax(dim=-1), sampled_B)
    return tokens_B, logp_BV.gather(1, tokens_B[:, None]).squeeze(1).float()


def _truncate(probs_BV: torch.Tensor, top_p_B: torch.Tensor, top_k_B: torch.Tensor) -> torch.Tensor:
    """Zero the tokens outside top-k and outside the top-p nucleus (the smallest set of most likely tokens
    whose mass reaches top_p; the token that crosses top_p is kept). Not renormalised: the caller's CDF
    sampling scales by the row total."""
    V = probs_BV.shape[1]
    sorted_BV, order_BV = probs_BV.sort(dim=-1, descending=True)
    rank_V = torch.arange(V, device=probs_BV.device)
    k_B = torch.where(top_k_B > 0, top_k_B, torch.full_like(top_k_B, V))
    keep_BV = rank_V[None, :] < k_B[:, None]
    mass_before_BV = sorted_BV.cumsum(dim=-1) - sorted_BV
    keep_BV &= mass_before_BV < top_p_B[:, None]
    keep_BV[:, 0] = True  # the most likely token always survives
    kept_sorted_BV = torch.where(keep_BV, sorted_BV, torch.zeros_like(sorted_BV))
    return torch.zeros_like(probs_BV).scatter_(1, order_BV, kept_sorted_BV)
