"""Policy losses of ALGORITHM.md §3-§4 behind one interface (§8 is a fixed contract):

    loss, metrics = compute_policy_loss(logprobs_BT, prox_logprobs_BT, rollout_logprobs_BT, advantages_B,
                                        response_mask_BT, LossConfig(name="minirl"))

Inputs: `logprobs` = log pi_theta of the sampled tokens (requires grad), `prox_logprobs` = log pi_prox (the
learner's proximal forward), `rollout_logprobs` = log mu_old (the sampler), all `[B, T]`; `advantages` `[B]`
one per response; `response_mask` `[B, T]` marks response tokens (padding and prompt positions are ignored,
whatever values they hold). Ratios: staleness `r = exp(logp - prox)`, discrepancy `d = exp(prox - mu)`.

Advantages are used **as given**: the loss never normalises them. MiniRL-family losses expect
`group_advantages(R, normalize_std=False)`; `grpo` and `cispo` expect `normalize_std=True`
(`advantages.needs_std_advantages(name)` says which; the Trainer follows it).

| name | per-token weight on grad log pi | normaliser |
|---|---|---|
| minirl | M * min(d, is_cap) * r | 1/n |
| minirl_no_is | M * r | 1/n |
| minirl_lennorm | M * min(d, is_cap) * r | 1/(n |y_i|) |
| grpo | PPO clipped surrogate min(r A, clip(r) A) (gradient flows through r) | 1/(n |y_i|) |
| cispo | sg[clip(r, 1-eps_low, 1+eps_high)] * A, no mask | 1/sum_i |y_i| |
| minirl_icepop | M * d * 1[lo <= d <= hi] * r | 1/n |

`M` is the token clipping mask: 0 where (A > 0 and r > 1 + eps_high) or (A < 0 and r < 1 - eps_low).
`n` is the number of rows B (every row is one response). For data-parallel training the caller may pass the
global `num_seqs` / `num_tokens` so that the per-rank losses add up to the global one.

Metrics (floats, means over response tokens): `loss/policy`, `loss/clip_frac` (tokens whose gradient the
clip removes; for cispo: tokens whose weight was clipped), `is/d_mean`, `is/d_max`, `is/trunc_frac`
(tokens with d > is_cap; for minirl_icepop: tokens masked out because d is outside [lo, hi]),
`loss/num_tokens`.

Legend: B responses, T tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

LOSS_NAMES = ("minirl", "minirl_no_is", "minirl_lennorm", "grpo", "cispo", "minirl_icepop")


@dataclass
class LossConfig:
    """Which loss and its constants (defaults: ALGORITHM.md §3)."""

    name: str = "minirl"
    """One of LOSS_NAMES."""
    eps_low: float = 0.2
    """Lower clipping epsilon (r < 1 - eps_low is clipped when A < 0)."""
    eps_high: float = 0.27
    """Upper clipping epsilon (r > 1 + eps_high is clipped when A > 0)."""
    is_cap: float = 5.0
    """Truncation cap of the discrepancy ratio d."""
    icepop_low: float = 0.5
    """IcePop: tokens with d below this are masked."""
    icepop_high: float = 5.0
    """IcePop: tokens with d above this are masked."""

    def __post_init__(self) -> None:
        if self.name not in LOSS_NAMES:
            raise ValueError(f"unknown loss {self.name!r}; choose one of {', '.join(LOSS_NAMES)}")
        if not 0 <= self.eps_low < 1 or self.eps_high < 0:
            raise ValueError(f"need 0 <= eps_low < 1 and eps_high >= 0, got {self.eps_low}, {self.eps_high}")
        if self.is_cap <= 0 or not 0 < self.icepop_low < self.icepop_high:
            raise ValueError("need is_cap > 0 and 0 < icepop_low < icepop_high")

    @classmethod
    def from_algo(cls, algo: object) -> LossConfig:
        """From the `algo` section of `minirl_async.config.Config`."""
        return cls(**{k: getattr(algo, k if k != "name" else "loss") for k in
                      ("name", "eps_low", "eps_high", "is_cap", "icepop_low", "icepop_high")})


@dataclass
class _Terms:
    """Everything a loss needs, with padding neutralised (ratios 1, log-probs 0 where mask is 0)."""

    lp_BT: torch.Tensor       # log pi_theta (grad)
    r_BT: torch.Tensor        # exp(lp - prox) (grad flows through lp)
    d_BT: torch.Tensor        # exp(prox - mu) (no grad)
    A_B1: torch.Tensor
    mask_BT: torch.Tensor     # float 0/1
    keep_BT: torch.Tensor     # float clipping mask M
    len_B: torch.Tensor       # |y_i| (at least 1)
    n: float                  # number of responses (normaliser)
    num_tokens: float         # total response tokens (normaliser)


def _per_seq_mean(x_BT: torch.Tensor, t: _Terms) -> torch.Tensor:
    return ((x_BT * t.mask_BT).sum(1) / t.len_B).sum() / t.n


def _minirl_weighted(w_BT: torch.Tensor, t: _Terms, lennorm: bool) -> torch.Tensor:
    obj_BT = (t.keep_BT * w_BT * t.r_BT).detach() * t.A_B1 * t.lp_BT
    return -_per_seq_mean(obj_BT, t) if lennorm else -(obj_BT * t.mask_BT).sum() / t.n


def _minirl(t: _Terms, c: LossConfig) -> torch.Tensor:
    return _minirl_weighted(t.d_BT.clamp(max=c.is_cap), t, lennorm=False)


def _minirl_no_is(t: _Terms, c: LossConfig) -> torch.Tensor:
    return _minirl_weighted(torch.ones_like(t.d_BT), t, lennorm=False)


def _minirl_lennorm(t: _Terms, c: LossConfig) -> torch.Tensor:
    return _minirl_weighted(t.d_BT.clamp(max=c.is_cap), t, lennorm=True)


def _minirl_icepop(t: _Terms, c: LossConfig) -> torch.Tensor:
    inside_BT = (t.d_BT >= c.icepop_low) & (t.d_BT <= c.icepop_high)
    # where, not a product: an overflowed d (inf) outside the band must give 0, not inf * 0 = NaN
    return _minirl_weighted(torch.where(inside_BT, t.d_BT, torch.zeros_like(t.d_BT)), t, lennorm=False)


def _grpo(t: _Terms, c: LossConfig) -> torch.Tensor:
    # The ratio here is against the proximal policy (decoupled PPO); no train-inference correction.
    surr_BT = torch.minimum(t.r_BT * t.A_B1, t.r_BT.clamp(1 - c.eps_low, 1 + c.eps_high) * t.A_B1)
    return -_per_seq_mean(surr_BT, t)


def _cispo(t: _Terms, c: LossConfig) -> torch.Tensor:
    w_BT = t.r_BT.detach().clamp(1 - c.eps_low, 1 + c.eps_high)
    return -(w_BT * t.A_B1 * t.lp_BT * t.mask_BT).sum() / t.num_tokens


LOSSES: dict[str, Callable[[_Terms, LossConfig], torch.Tensor]] = {
    "minirl": _minirl, "minirl_no_is": _minirl_no_is, "minirl_lennorm": _minirl_lennorm,
    "grpo": _grpo, "cispo": _cispo, "minirl_icepop": _minirl_icepop,
}
"""The registry of ALGORITHM.md §4: name -> loss of the prepared terms."""


def compute_policy_loss(logprobs: torch.Tensor, prox_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor,
                        advantages: torch.Tensor, response_mask: torch.Tensor, cfg: LossConfig, *,
                        num_seqs: float | None = None,
                        num_tokens: float | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Scalar policy loss and its metrics (see the module docstring). `num_seqs` / `num_tokens` override
    the normalisers n and sum_i |y_i| (default: this batch's own)."""
    if logprobs.dim() != 2:
        raise ValueError(f"logprobs must be [B, T], got shape {tuple(logprobs.shape)}")
    for name, x in (("prox_logprobs", prox_logprobs), ("rollout_logprobs", rollout_logprobs),
                    ("response_mask", response_mask)):
        if x.shape != logprobs.shape:
            raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(logprobs.shape)} like logprobs")
    if advantages.shape != logprobs.shape[:1]:
        raise ValueError(f"advantages must be [B] = [{logprobs.shape[0]}], got {tuple(advantages.shape)}")
    dt = logprobs.dtype
    valid_BT = response_mask.bool()
    mask_BT = valid_BT.to(dt)
    zero = torch.zeros((), dtype=dt, device=logprobs.device)
    lp_BT = torch.where(valid_BT, logprobs, zero)
    prox_BT = torch.where(valid_BT, prox_logprobs.detach().to(dt), zero)
    mu_BT = torch.where(valid_BT, rollout_logprobs.detach().to(dt), zero)
    r_BT = torch.exp(lp_BT - prox_BT)
    d_BT = torch.exp(prox_BT - mu_BT)
    A_B1 = advantages.detach().to(dt)[:, None]
    r_sg = r_BT.detach()
    clipped_BT = ((A_B1 > 0) & (r_sg > 1 + cfg.eps_high)) | ((A_B1 < 0) & (r_sg < 1 - cfg.eps_low))
    tok = float(mask_BT.sum())
    t = _Terms(lp_BT=lp_BT, r_BT=r_BT, d_BT=d_BT, A_B1=A_B1, mask_BT=mask_BT,
               keep_BT=(~clipped_BT).to(dt), len_B=mask_BT.sum(1).clamp(min=1),
               n=float(num_seqs if num_seqs is not None else logprobs.shape[0]),
               num_tokens=float(num_tokens if num_tokens is not None else max(tok, 1.0)))
    loss = LOSSES[cfg.name](t, cfg)

    with torch.no_grad():
        denom = max(tok, 1.0)
        if cfg.name == "cispo":
            clip_BT = (r_sg < 1 - cfg.eps_low) | (r_sg > 1 + cfg.eps_high)
        else:
            clip_BT = clipped_BT
        # d in float64 for the figures: exp overflows float32 past a log-ratio of ~88, float64 past ~709
        d_BT = torch.where(valid_BT, (prox_BT.double() - mu_BT.double()).exp(), 0.0)
        if cfg.name == "minirl_icepop":
            trunc_BT = (d_BT < cfg.icepop_low) | (d_BT > cfg.icepop_high)
        else:
            trunc_BT = d_BT > cfg.is_cap
        metrics = {
            "loss/policy": float(loss.detach()),
            "loss/clip_frac": float((clip_BT & valid_BT).sum()) / denom,
            "is/d_mean": float(d_BT.sum()) / denom,
            "is/d_max": float(d_BT.max()) if tok else 0.0,
            "is/trunc_frac": float((trunc_BT & valid_BT).sum()) / denom,
            "loss/num_tokens": tok,
        }
    return loss, metrics
