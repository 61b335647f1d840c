"""Losses of ALGORITHM.md §4 against plain per-token Python loops (value and analytic gradient, fp64),
plus hand-built cases for the clipping mask, TIS truncation and the IcePop mask."""

from __future__ import annotations

import math

import pytest
import torch

from minirl_async.algo.advantages import group_advantages, needs_std_advantages
from minirl_async.algo.losses import LOSS_NAMES, LossConfig, compute_policy_loss


def reference(name, lp, prox, mu, A, mask, c: LossConfig):
    """Loss and d loss / d logprobs by explicit loops over responses and tokens (no tensors ops)."""
    B, T = len(lp), len(lp[0])
    n = B
    lens = [sum(mask[i]) for i in range(B)]
    tot = sum(lens)
    loss = 0.0
    grad = [[0.0] * T for _ in range(B)]
    for i in range(B):
        for t in range(T):
            if not mask[i][t]:
                continue
            r = math.exp(lp[i][t] - prox[i][t])
            d = math.exp(prox[i][t] - mu[i][t])
            a = A[i]
            m = 0.0 if (a > 0 and r > 1 + c.eps_high) or (a < 0 and r < 1 - c.eps_low) else 1.0
            if name in ("minirl", "minirl_lennorm", "minirl_no_is", "minirl_icepop"):
                if name == "minirl_no_is":
                    w = m * r
                elif name == "minirl_icepop":
                    w = m * (d if c.icepop_low <= d <= c.icepop_high else 0.0) * r
                else:
                    w = m * min(d, c.is_cap) * r
                norm = n * lens[i] if name == "minirl_lennorm" else n
                loss -= w * a * lp[i][t] / norm
                grad[i][t] = -w * a / norm
            elif name == "grpo":
                lo, hi = 1 - c.eps_low, 1 + c.eps_high
                rc = min(max(r, lo), hi)
                unclipped, clipped = r * a, rc * a
                norm = n * lens[i]
                loss -= min(unclipped, clipped) / norm
                # d(r a)/d lp = r a when the unclipped branch is the min (or both equal and r inside)
                grad[i][t] = -(r * a) / norm if unclipped <= clipped else 0.0
            elif name == "cispo":
                w = min(max(r, 1 - c.eps_low), 1 + c.eps_high)
                loss -= w * a * lp[i][t] / tot
                grad[i][t] = -w * a / tot
    return loss, grad


def random_case(seed, B=5, T=7):
    g = torch.Generator().manual_seed(seed)
    lp = -torch.rand(B, T, generator=g, dtype=torch.float64) * 3
    prox = lp + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.3   # r spread across the clip band
    mu = prox + torch.randn(B, T, generator=g, dtype=torch.float64) * 1.0   # d spread around the cap
    A = torch.randn(B, generator=g, dtype=torch.float64)
    A[0] = 0.0
    mask = torch.rand(B, T, generator=g) < 0.75
    mask[:, 0] = True
    # garbage where mask is 0 must not matter
    prox = torch.where(mask, prox, torch.full_like(prox, 300.0))
    mu = torch.where(mask, mu, torch.full_like(mu, -300.0))
    return lp, prox, mu, A, mask


@pytest.mark.parametrize("name", LOSS_NAMES)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_matches_per_token_loop(name, seed):
    c = LossConfig(name=name, is_cap=2.0, icepop_low=0.5, icepop_high=2.0)
    lp, prox, mu, A, mask = random_case(seed)
    x = lp.clone().requires_grad_(True)
    loss, metrics = compute_policy_loss(x, prox, mu, A, mask, c)
    loss.backward()
    ref_loss, ref_grad = reference(name, lp.tolist(), prox.tolist(), mu.tolist(), A.tolist(), mask.tolist(), c)
    assert abs(loss.item() - ref_loss) < 1e-12
    assert 0 < metrics["loss/clip_frac"] < 1 and 0 < metrics["is/trunc_frac"] < 1  # both regimes exercised
    assert torch.allclose(x.grad, torch.tensor(ref_grad, dtype=torch.float64), atol=1e-12, rtol=0)
    assert metrics["loss/num_tokens"] == float(mask.sum())


def test_clipping_mask_hand_built():
    # one response, A > 0: tokens with r = 1.5 (clipped, > 1.27), 1.2 (kept), 0.5 (kept: low side only for A < 0)
    c = LossConfig(name="minirl_no_is")
    prox = torch.zeros(2, 3, dtype=torch.float64)
    lp = torch.log(torch.tensor([[1.5, 1.2, 0.5], [1.5, 1.2, 0.5]], dtype=torch.float64)).requires_grad_(True)
    A = torch.tensor([1.0, -1.0], dtype=torch.float64)
    mask = torch.ones(2, 3, dtype=torch.bool)
    loss, m = compute_policy_loss(lp, prox, prox, A, mask, c)
    loss.backward()
    # row 0 (A>0): token 0 clipped; row 1 (A<0): token 2 (r=0.5 < 0.8) clipped
    want = torch.tensor([[0.0, -1.2, -0.5], [1.5, 1.2, 0.0]], dtype=torch.float64) / 2
    assert torch.allclose(lp.grad, want, atol=1e-15)
    assert m["loss/clip_frac"] == pytest.approx(2 / 6)


def test_truncation_hand_built():
    c = LossConfig(name="minirl", is_cap=5.0)
    lp = torch.zeros(1, 3, dtype=torch.float64, requires_grad=True)
    prox = torch.zeros(1, 3, dtype=torch.float64)
    mu = -torch.log(torch.tensor([[10.0, 2.0, 0.1]], dtype=torch.float64))  # d = 10, 2, 0.1
    loss, m = compute_policy_loss(lp, prox, mu, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 3), c)
    loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[5.0, 2.0, 0.1]], dtype=torch.float64), atol=1e-12)
    assert m["is/trunc_frac"] == pytest.approx(1 / 3)
    assert m["is/d_max"] == pytest.approx(10.0)
    assert m["is/d_mean"] == pytest.approx((10 + 2 + 0.1) / 3)


def test_icepop_mask_hand_built():
    c = LossConfig(name="minirl_icepop", icepop_low=0.5, icepop_high=5.0)
    lp = torch.zeros(1, 4, dtype=torch.float64, requires_grad=True)
    prox = torch.zeros(1, 4, dtype=torch.float64)
    mu = -torch.log(torch.tensor([[10.0, 2.0, 0.4, 0.5]], dtype=torch.float64))  # d = 10, 2, 0.4, 0.5
    loss, m = compute_policy_loss(lp, prox, mu, torch.tensor([1.0], dtype=torch.float64), torch.ones(1, 4), c)
    loss.backward()
    assert torch.allclose(lp.grad, -torch.tensor([[0.0, 2.0, 0.0, 0.5]], dtype=torch.float64), atol=1e-12)
    assert m["is/trunc_frac"] == pytest.approx(2 / 4)


def test_overflowing_discrepancy_ratio_stays_finite():
    # float32 log-probs with prox - mu = 100: d = e^100 overflows float32. IcePop masks that token (0, not
    # inf * 0 = NaN), the truncating losses cap it, and the d figures are exact (computed in float64).
    lp = torch.full((1, 3), -1.0, requires_grad=True)
    mu = torch.tensor([[-1.0, -101.0, -1.0]])
    for name in ("minirl_icepop", "minirl"):
        loss, m = compute_policy_loss(lp, lp.detach(), mu, torch.tensor([1.0]), torch.ones(1, 3), LossConfig(name=name))
        assert torch.isfinite(loss), name
        assert m["is/d_max"] == pytest.approx(math.exp(100), rel=1e-6) and m["is/trunc_frac"] == pytest.approx(1 / 3)
        (g,) = torch.autograd.grad(loss, lp)
        want_mid = 0.0 if name == "minirl_icepop" else -5.0   # masked, or d capped at is_cap = 5
        assert torch.allclose(g, torch.tensor([[-1.0, want_mid, -1.0]])), (name, g)


def test_on_policy_weights_are_one():
    # theta == theta_old and mu == pi: r = d = 1, M = 1 -> gradient is -(A / n) per token
    lp = -torch.rand(3, 4, dtype=torch.float64)
    x = lp.clone().requires_grad_(True)
    A = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    loss, m = compute_policy_loss(x, lp, lp, A, torch.ones(3, 4), LossConfig())
    loss.backward()
    assert torch.allclose(x.grad, -(A / 3)[:, None].expand(3, 4))
    assert m["loss/clip_frac"] == 0.0 and m["is/d_mean"] == 1.0


def test_global_normalisers_split_exactly():
    # two halves with global n / tokens add up to the whole batch's loss
    lp, prox, mu, A, mask = random_case(7, B=6)
    for name in LOSS_NAMES:
        c = LossConfig(name=name)
        whole, _ = compute_policy_loss(lp, prox, mu, A, mask, c)
        parts = sum(compute_policy_loss(lp[s], prox[s], mu[s], A[s], mask[s], c, num_seqs=6,
                                        num_tokens=float(mask.sum()))[0] for s in (slice(0, 3), slice(3, 6)))
        assert abs(float(whole) - float(parts)) < 1e-12, name


def test_bad_inputs():
    z = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="unknown loss"):
        LossConfig(name="ppo")
    with pytest.raises(ValueError, match="advantages"):
        compute_policy_loss(z, z, z, torch.zeros(3), z, LossConfig())
    with pytest.raises(ValueError, match="prox_logprobs"):
        compute_policy_loss(z, torch.zeros(2, 4), z, torch.zeros(2), z, LossConfig())


def test_group_advantages():
    R = torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0], [3.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    A = group_advantages(R, normalize_std=False)
    for g in range(3):
        mean = sum(R[g].tolist()) / 4
        assert A[g].tolist() == pytest.approx([r - mean for r in R[g].tolist()])
    As = group_advantages(R, normalize_std=True)
    for g in range(3):
        mean = sum(R[g].tolist()) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in R[g].tolist()) / 4)
        assert As[g].tolist() == pytest.approx([(r - mean) / (std + 1e-6) for r in R[g].tolist()], abs=1e-12)
    assert As[1].abs().max() == 0.0  # equal rewards: zero advantage, not NaN
    assert needs_std_advantages("grpo") and needs_std_advantages("cispo") and not needs_std_advantages("minirl")
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(torch.zeros(3, 1), False)
    with pytest.raises(ValueError, match="NaN"):
        group_advantages(torch.tensor([[0.0, float("nan")]]), False)
