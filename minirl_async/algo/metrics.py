"""Per-step learner metrics of ALGORITHM.md §7 (names are contracts), computed from per-token tensors.

Every function returns token means as Python floats plus, where the caller aggregates over minibatches or
ranks, the number of tokens they average over (`weighted` means combine as sum(mean * count) / sum(count)).

    train_infer_kl(prox_lp_BT, rollout_lp_BT, mask_BT)       # kl/train_infer_k1, kl/train_infer_k3
    staleness_kl(new_lp_BT, prox_lp_BT, mask_BT)             # kl/staleness_k3
    masked_mean(entropy_BT, mask_BT)                         # policy/entropy (entropy from algo.logprobs)
    routing_agreement(learner_BTLK, sampler_BTLK, valid_BT)  # routing/agree_frac, routing/agree_frac_l{i}

Estimators (samples y ~ mu, approximately pi_prox): with `rho = pi_prox / mu` per token,
k1 = mean(log mu - log pi_prox) and k3 = mean(rho - 1 - log rho) (Schulman's unbiased, non-negative
estimator of KL(mu || pi_prox)). Staleness uses `rho = pi_theta / pi_prox` (KL(pi_prox || pi_theta)).

Legend: B batch, T tokens, L MoE layers, K top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def masked_mean(x_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    """Mean of `x` over the positions where `mask` is nonzero (0.0 when there are none)."""
    m = mask_BT.bool()
    n = int(m.sum())
    return float(x_BT[m].sum()) / n if n else 0.0


def _k3(log_rho_BT: torch.Tensor, mask_BT: torch.Tensor) -> float:
    m = mask_BT.bool()
    lr = log_rho_BT[m].double()
    return float((torch.exp(lr) - 1 - lr).mean()) if lr.numel() else 0.0


def train_infer_kl(prox_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, float]:
    """`kl/train_infer_k1` = mean(log mu - log pi_prox), `kl/train_infer_k3` = mean(rho - 1 - log rho),
    rho = pi_prox / mu, over the masked (response) tokens."""
    log_rho = prox_logprobs.detach().double() - rollout_logprobs.detach().double()
    return {"kl/train_infer_k1": masked_mean(-log_rho, mask), "kl/train_infer_k3": _k3(log_rho, mask)}


def staleness_kl(new_logprobs: torch.Tensor, prox_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """`kl/staleness_k3` between pi_theta after the step and pi_prox (rho = pi_theta / pi_prox)."""
    log_rho = new_logprobs.detach().double() - prox_logprobs.detach().double()
    return {"kl/staleness_k3": _k3(log_rho, mask)}


def routing_agreement(learner_BTLK: torch.Tensor, sampler_BTLK: torch.Tensor, valid_BT: torch.Tensor,
                      layer_ids: Sequence[int] | None = None) -> dict[str, float]:
    """Fraction of (token, MoE layer) pairs whose learner top-k SET equals the sampler's (order inside
    the top-k is irrelevant), overall (`routing/agree_frac`) and per layer (`routing/agree_frac_l{i}`,
    `i` = the model layer index from `layer_ids`, default 0..L-1). Only `valid_BT` positions count."""
    if learner_BTLK.shape != sampler_BTLK.shape:
        raise ValueError(f"learner routes {tuple(learner_BTLK.shape)} and sampler routes "
                         f"{tuple(sampler_BTLK.shape)} differ in shape")
    L = learner_BTLK.shape[2]
    ids = list(layer_ids) if layer_ids is not None else list(range(L))
    if len(ids) != L:
        raise ValueError(f"{len(ids)} layer ids for {L} MoE layers")
    a_BTLK = learner_BTLK.long().sort(dim=-1).values
    b_BTLK = sampler_BTLK.long().sort(dim=-1).values
    same_BTL = (a_BTLK == b_BTLK).all(dim=-1)
    m = valid_BT.bool()
    n = int(m.sum())
    out: dict[str, float] = {}
    per_layer_NL = same_BTL[m].double()
    out["routing/agree_frac"] = float(per_layer_NL.mean()) if n and L else 0.0
    for j, lid in enumerate(ids):
        out[f"routing/agree_frac_l{lid}"] = float(per_layer_NL[:, j].mean()) if n else 0.0
    return out
