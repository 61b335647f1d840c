"""Staleness: weight versions, the admission bound, the consumption guard, measured lag and the automatic
choice of routing replay (ALGORITHM.md section 6). Pure logic: no sockets, no torch.

Vocabulary (ALGORITHM.md section 6):
- `v`  the learner's version = completed global steps; the batch of step v is consumed at version v.
- `b`  a sample's behaviour version = the OLDEST version among its response tokens (conservative when a
       weight update interrupted its generation).
- `eta` = `staleness.max_staleness`; `N` = minibatch updates per global step; `k` = minibatch index 0..N-1.

    tr = StalenessTracker(cfg.staleness, num_minibatches=cfg.num_minibatches)
    tr.admission_limit(v, groups_per_step)         # issued groups allowed so far
    tr.is_stale(oldest_version=b, version=v)       # consumption guard
    d = tr.choose_mode(v, [b for each sample], routes_available=...)   # -> ReplayDecision (mode, signals)
    tr.prev_kl_k3 = metrics["kl/train_infer_k3"]            # the KL signal of the next decision
    m = lag_metrics(v, [[b, ...] per minibatch], N)          # staleness/* metrics of the step

    python -m minirl_async.staleness       # prints the auto policy's choice for N = 1, 2, 4, 8 and eta = 0, 1
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from minirl_async.config import StalenessSection

# replay/mode values logged every step (ALGORITHM.md section 7).
MODE_NONE, MODE_R2, MODE_R3 = 0, 2, 3
MODE_NAMES = {MODE_NONE: "none", MODE_R2: "r2", MODE_R3: "r3"}
_FORCED = {"none": MODE_NONE, "r2": MODE_R2, "r3": MODE_R3}


def admission_limit(version: int, max_staleness: int, groups_per_step: int) -> int:
    """Largest `groups_issued_total` the controller may reach at learner version `version`.

    ALGORITHM.md: a new group is handed out only while `groups_issued_total <= (v + eta + 1) * groups_per_step`.
    We read the count as "after issuing", so at v = 0 with eta = 0 exactly one step's groups go out: the
    synchronous schedule. Re-issues of an already counted group do not count again (they replace a loss).
    """
    return (version + max_staleness + 1) * groups_per_step


def is_stale(oldest_version: int, version: int, max_staleness: int) -> bool:
    """Consumption guard: a group whose oldest token version is older than `v - eta` is not trained on."""
    return oldest_version < version - max_staleness


def lag_updates(version: int, behaviour_version: int, num_minibatches: int, minibatch_index: int) -> int:
    """Optimizer updates between the behaviour weights and the target of minibatch k: `(v - b) * N + k`."""
    assert 0 <= minibatch_index < num_minibatches, (minibatch_index, num_minibatches)
    assert behaviour_version <= version, (behaviour_version, version)
    return (version - behaviour_version) * num_minibatches + minibatch_index


def max_lag(version: int, oldest_behaviour_version: int, num_minibatches: int) -> int:
    """The batch's largest lag, reached in its last minibatch: `(v - b_min) * N + N - 1`."""
    return lag_updates(version, oldest_behaviour_version, num_minibatches, num_minibatches - 1)


def lag_metrics(version: int, behaviour_versions_per_minibatch: Sequence[Sequence[int]],
                num_minibatches: int) -> dict[str, Any]:
    """`staleness/*` metrics of one step from the behaviour version of every sample, grouped by minibatch.

    `staleness/lag_updates_hist` is a list of counts indexed by lag (0 .. max), so it stays JSON and the
    report can sum histograms across steps.
    """
    lags: list[int] = []
    version_lags: list[int] = []
    for k, versions in enumerate(behaviour_versions_per_minibatch):
        for b in versions:
            lags.append(lag_updates(version, b, num_minibatches, k))
            version_lags.append(version - b)
    if not lags:
        return {"staleness/lag_updates_mean": 0.0, "staleness/lag_updates_max": 0,
                "staleness/version_lag_max": 0, "staleness/version_lag_mean": 0.0,
                "staleness/lag_updates_hist": []}
    counts = Counter(lags)
    return {
        "staleness/lag_updates_mean": sum(lags) / len(lags),
        "staleness/lag_updates_max": max(lags),
        "staleness/version_lag_max": max(version_lags),
        "staleness/version_lag_mean": sum(version_lags) / len(version_lags),
        "staleness/lag_updates_hist": [counts.get(i, 0) for i in range(max(lags) + 1)],
    }


@dataclass
class ReplayDecision:
    """The routing replay mode of one step and the signals that chose it (all logged)."""

    mode: int
    """MODE_NONE (0), MODE_R2 (2) or MODE_R3 (3)."""
    max_lag: int
    """`(v - b_min) * N + N - 1` of the batch."""
    lag_says_r3: bool
    """`max_lag >= r3_min_lag`."""
    kl_says_r3: bool
    """The previous step's kl/train_infer_k3 exceeded `r3_kl_threshold` (False when the threshold is off)."""
    wants: int
    """The mode the signals ask for this step, before hysteresis."""
    streak: int
    """Consecutive steps (including this one) the signals asked for `wants`."""
    forced: bool
    """The mode comes from the config, not from the auto policy."""
    no_routes: bool = False
    """The signals asked for R3 but some response of the batch carries no sampler routes: R2 instead."""

    def metrics(self) -> dict[str, Any]:
        return {
            "replay/mode": self.mode,
            "replay/max_lag": self.max_lag,
            "replay/lag_says_r3": int(self.lag_says_r3),
            "replay/kl_says_r3": int(self.kl_says_r3),
            "replay/wants": self.wants,
            "replay/streak": self.streak,
            "replay/forced": int(self.forced),
            "replay/no_routes": int(self.no_routes),
        }

    def describe(self) -> str:
        why = "forced by staleness.routing_replay" if self.forced else (
            f"max_lag={self.max_lag} lag_says_r3={self.lag_says_r3} kl_says_r3={self.kl_says_r3} "
            f"wants={MODE_NAMES[self.wants]} streak={self.streak}"
            + (" r3_without_routes->r2" if self.no_routes else ""))
        return f"replay mode {MODE_NAMES[self.mode]} ({why})"


@dataclass
class StalenessTracker:
    """Per-run staleness state: the staleness config, N, and the auto policy's hysteresis memory."""

    cfg: StalenessSection
    num_minibatches: int
    mode: int | None = None
    """The mode in force (None before the first decision)."""
    prev_kl_k3: float | None = None
    """The previous step's kl/train_infer_k3 (the auto policy's second signal; part of the saved state)."""
    _wants: int | None = field(default=None, repr=False)
    _streak: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        if self.num_minibatches < 1:
            raise ValueError(f"num_minibatches must be >= 1 (got {self.num_minibatches})")

    @property
    def eta(self) -> int:
        return self.cfg.max_staleness

    def admission_limit(self, version: int, groups_per_step: int) -> int:
        return admission_limit(version, self.eta, groups_per_step)

    def is_stale(self, oldest_version: int, version: int) -> bool:
        return is_stale(oldest_version, version, self.eta)

    def choose_mode(self, version: int, behaviour_versions: Sequence[int],
                    routes_available: bool = True) -> ReplayDecision:
        """Decide the replay mode of the step consumed at `version` (before its proximal forward).

        Auto: R3 when `max_lag >= r3_min_lag` or (threshold set and the previous step's kl/train_infer_k3,
        `self.prev_kl_k3`, is above it), else R2. R3 replays the sampler's
        routes, so a batch in which some response has none (`routes_available=False`) gets R2 instead
        (`no_routes` in the decision). The first decision is taken as is; afterwards the mode changes only
        once the signals asked for the other mode `hysteresis_steps` steps in a row.
        """
        b_min = min(behaviour_versions) if behaviour_versions else version
        lag = max_lag(version, b_min, self.num_minibatches)
        lag_r3 = lag >= self.cfg.r3_min_lag
        thr = self.cfg.r3_kl_threshold
        kl_r3 = thr is not None and self.prev_kl_k3 is not None and self.prev_kl_k3 > thr
        no_routes = (lag_r3 or kl_r3) and not routes_available
        wants = MODE_R3 if (lag_r3 or kl_r3) and routes_available else MODE_R2
        if self.cfg.routing_replay != "auto":
            forced_mode = _FORCED[self.cfg.routing_replay]
            self.mode, self._wants, self._streak = forced_mode, forced_mode, 0
            return ReplayDecision(forced_mode, lag, lag_r3, kl_r3, forced_mode, 0, True)
        self._streak = self._streak + 1 if wants == self._wants else 1
        self._wants = wants
        if self.mode is None or (wants != self.mode and self._streak >= self.cfg.hysteresis_steps):
            self.mode = wants
        if self.mode == MODE_R3 and not routes_available:   # hysteresis never keeps R3 without routes
            self.mode = MODE_R2
        return ReplayDecision(self.mode, lag, lag_r3, kl_r3, wants, self._streak, False, no_routes)

    def state_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "wants": self._wants, "streak": self._streak, "prev_kl_k3": self.prev_kl_k3}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.mode, self._wants, self._streak = state["mode"], state["wants"], int(state["streak"])
        self.prev_kl_k3 = state.get("prev_kl_k3")


if __name__ == "__main__":
    for eta in (0, 1):
        for n in (1, 2, 4, 8):
            tr = StalenessTracker(StalenessSection(max_staleness=eta), num_minibatches=n)
            d = tr.choose_mode(version=5, behaviour_versions=[5 - eta])
            print(f"eta={eta} N={n}: {d.describe()}")
