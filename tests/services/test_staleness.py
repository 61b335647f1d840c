"""Staleness tracker: the admission bound, the consumption guard, lag measurement and the auto R2/R3 policy
(ALGORITHM.md section 6), checked against hand-computed values."""

from __future__ import annotations

import pytest

from minirl_async.config import StalenessSection
from minirl_async.staleness import (
    MODE_NONE,
    MODE_R2,
    MODE_R3,
    StalenessTracker,
    admission_limit,
    is_stale,
    lag_metrics,
    lag_updates,
    max_lag,
)


def test_admission_limit_is_one_step_per_version_plus_eta():
    assert admission_limit(0, 0, 8) == 8  # synchronous: exactly the first step's groups
    assert admission_limit(3, 0, 8) == 32
    assert admission_limit(0, 1, 8) == 16
    assert admission_limit(2, 2, 4) == 20


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_consumption_guard_boundary(eta):
    v = 5
    assert not is_stale(v - eta, v, eta)  # exactly eta versions old is allowed
    assert is_stale(v - eta - 1, v, eta)
    assert not is_stale(v, v, eta)


def test_lag_updates_formula():
    assert lag_updates(5, 5, 1, 0) == 0
    assert lag_updates(5, 4, 4, 2) == 6  # (5-4)*4 + 2
    assert max_lag(5, 3, 2) == 5  # (5-3)*2 + 1
    with pytest.raises(AssertionError):
        lag_updates(5, 6, 1, 0)  # a rollout from the future is a bug


def test_lag_metrics_mean_max_hist():
    # v=3, N=2: minibatch 0 samples from versions 3, 2; minibatch 1 from 3, 3 -> lags 0, 2, 1, 1
    m = lag_metrics(3, [[3, 2], [3, 3]], 2)
    assert m["staleness/lag_updates_mean"] == pytest.approx(1.0)
    assert m["staleness/lag_updates_max"] == 2
    assert m["staleness/version_lag_max"] == 1
    assert m["staleness/lag_updates_hist"] == [1, 2, 1]
    assert lag_metrics(0, [], 1)["staleness/lag_updates_max"] == 0


def _tracker(n, **kw):
    return StalenessTracker(StalenessSection(**kw), num_minibatches=n)


@pytest.mark.parametrize("n,expected", [(1, MODE_R2), (2, MODE_R2), (4, MODE_R3), (8, MODE_R3)])
def test_auto_policy_on_policy_matches_paper(n, expected):
    # On-policy (b == v): max_lag = N - 1, so N=1,2 -> R2 and N>=4 -> R3 with the default r3_min_lag=3.
    d = _tracker(n, max_staleness=0).choose_mode(7, [7, 7])
    assert d.max_lag == n - 1
    assert d.mode == expected and not d.forced


def test_auto_policy_counts_staleness_in_updates():
    # N=2 but one sample one version old: (1)*2 + 1 = 3 -> R3.
    d = _tracker(2, max_staleness=1).choose_mode(4, [4, 3])
    assert d.max_lag == 3 and d.lag_says_r3 and d.mode == MODE_R3


def test_kl_signal_selects_r3():
    tr = _tracker(1, r3_kl_threshold=0.01)
    tr.prev_kl_k3 = 0.001
    assert tr.choose_mode(1, [1]).mode == MODE_R2
    tr.prev_kl_k3 = 0.05
    d = tr.choose_mode(2, [2])
    assert d.kl_says_r3 and not d.lag_says_r3 and d.mode == MODE_R3
    off = _tracker(1)   # threshold off by default
    off.prev_kl_k3 = 99.0
    assert off.choose_mode(1, [1]).mode == MODE_R2


def test_r3_needs_sampler_routes():
    # the signals ask for R3 (lag 3) but a response has no routes: R2, said so; hysteresis cannot keep R3
    tr = _tracker(4, max_staleness=0)
    d = tr.choose_mode(3, [3], routes_available=False)
    assert d.lag_says_r3 and d.wants == MODE_R2 and d.mode == MODE_R2 and d.no_routes
    assert d.metrics()["replay/no_routes"] == 1 and "r3_without_routes" in d.describe()
    assert tr.choose_mode(4, [4]).mode == MODE_R3
    sticky = _tracker(4, max_staleness=0, hysteresis_steps=5)
    assert sticky.choose_mode(3, [3]).mode == MODE_R3
    assert sticky.choose_mode(4, [4], routes_available=False).mode == MODE_R2


def test_hysteresis_needs_consecutive_steps():
    tr = _tracker(2, max_staleness=1, hysteresis_steps=3)
    fresh, stale = [5, 5], [5, 4]  # max_lag 1 (R2) vs 3 (R3)
    assert tr.choose_mode(5, fresh).mode == MODE_R2  # first decision taken as is
    assert tr.choose_mode(5, stale).mode == MODE_R2  # streak 1
    assert tr.choose_mode(5, stale).mode == MODE_R2  # streak 2
    assert tr.choose_mode(5, fresh).mode == MODE_R2  # streak broken
    assert tr.choose_mode(5, stale).mode == MODE_R2
    assert tr.choose_mode(5, stale).mode == MODE_R2
    d = tr.choose_mode(5, stale)  # third in a row
    assert d.mode == MODE_R3 and d.streak == 3
    assert tr.choose_mode(5, fresh).mode == MODE_R3  # and sticks until R2 holds 3 steps


def test_hysteresis_state_round_trip():
    # after R2 with a one-step streak towards R3, a restored tracker stays in R2 (a fresh one would take
    # R3 at once: its first decision is taken as is), and the KL signal survives too
    def make():
        return _tracker(2, max_staleness=1, hysteresis_steps=3, r3_kl_threshold=0.01)
    tr = make()
    assert tr.choose_mode(5, [5]).mode == MODE_R2
    assert tr.choose_mode(5, [4]).mode == MODE_R2   # wants R3, streak 1
    tr.prev_kl_k3 = 0.5
    tr2 = make()
    tr2.load_state_dict(tr.state_dict())
    assert tr2.state_dict() == tr.state_dict()
    assert make().choose_mode(5, [4]).mode == MODE_R3
    d2, d = tr2.choose_mode(5, [5]), tr.choose_mode(5, [5])   # lag says R2, the restored KL says R3
    assert d2.kl_says_r3 and d2.streak == d.streak == 2 and d2.mode == d.mode == MODE_R2
    assert tr2.choose_mode(5, [5]).mode == tr.choose_mode(5, [5]).mode == MODE_R3


@pytest.mark.parametrize("name,mode", [("r2", MODE_R2), ("r3", MODE_R3), ("none", MODE_NONE)])
def test_forced_modes(name, mode):
    d = _tracker(8, max_staleness=2, routing_replay=name).choose_mode(9, [7])
    assert d.mode == mode and d.forced
    m = d.metrics()
    assert m["replay/mode"] == mode and m["replay/max_lag"] == 2 * 8 + 7
    assert name in d.describe() or "forced" in d.describe()
