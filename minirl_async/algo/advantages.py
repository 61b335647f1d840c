"""Group-relative advantages (ALGORITHM.md §3, §4).

MiniRL uses `A_i = R_i - mean_j R_j` over the G responses of one prompt, with **no** division by the std.
GRPO and CISPO use the std-normalised form `(R_i - mean) / (std + eps)`; the losses themselves never touch
`A`, so the caller picks the form with `needs_std_advantages(loss_name)` (the Trainer does this).

    A_gG = group_advantages(rewards_gG, normalize_std=needs_std_advantages("grpo"))

Legend: g groups, G responses per group.
"""

from __future__ import annotations

import torch

STD_EPS = 1e-6
"""Added to the group std before dividing (a group of equal rewards gets A = 0, not NaN)."""

_STD_NORMALISED_LOSSES = frozenset({"grpo", "cispo"})


def needs_std_advantages(loss_name: str) -> bool:
    """True for the losses of ALGORITHM.md §4 defined with std-normalised advantages (grpo, cispo)."""
    return loss_name in _STD_NORMALISED_LOSSES


def group_advantages(rewards: torch.Tensor, normalize_std: bool) -> torch.Tensor:
    """Advantages `[num_groups, G]` from rewards `[num_groups, G]`.

    normalize_std=False: `R - mean_group(R)` (MiniRL). True: `(R - mean) / (std + 1e-6)` with the population
    std (`correction=0`, i.e. divide by G), so the advantages of a group have unit RMS.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [num_groups, G], got shape {tuple(rewards.shape)}")
    if rewards.shape[1] < 2:
        raise ValueError(f"a group baseline needs at least 2 responses per group, got G={rewards.shape[1]}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain NaN or inf")
    r_gG = rewards if rewards.is_floating_point() else rewards.double()
    a_gG = r_gG - r_gG.mean(dim=1, keepdim=True)
    if normalize_std:
        a_gG = a_gG / (r_gG.std(dim=1, keepdim=True, correction=0) + STD_EPS)
    return a_gG
