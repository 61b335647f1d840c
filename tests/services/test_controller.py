"""Controller: admission under eta = 0/1/2, leases, duplicates, the consumption guard, grader failures,
the no-loss invariant under random event sequences, and a checkpoint round trip. A fake clock drives the
leases; a fake prompt source stands in for the task stream."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from minirl_async.config import Config, StalenessSection
from minirl_async.controller import Controller
from minirl_async.staleness import StalenessTracker
from minirl_async.tasks.base import Prompt
from minirl_async.tasks.source import make_prompt_source


class FakeSource:
    def __init__(self) -> None:
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self) -> Prompt:
        self.i += 1
        return Prompt(text=f"p{self.i - 1}", meta={"answer": str(self.i - 1)})

    def state_dict(self) -> dict[str, Any]:
        return {"i": self.i}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.i = state["i"]


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def make(eta=1, gps=4, lease=10.0, n=1, source=None):
    clock = Clock()
    ctl = Controller(source or FakeSource(), StalenessTracker(StalenessSection(max_staleness=eta), n),
                     groups_per_step=gps, lease_s=lease, clock=clock)
    return ctl, clock


def deliver(ctl, tickets, version):
    return [ctl.accept(t.group_id, t.attempt, version, {"id": t.group_id}) for t in tickets]


@pytest.mark.parametrize("eta", [0, 1, 2])
def test_admission_bound(eta):
    ctl, _ = make(eta=eta, gps=4)
    got = ctl.grant("s0", max_groups=100, sampler_version=0)
    assert len(got) == (eta + 1) * 4  # (v + eta + 1) * gps at v = 0
    assert ctl.grant("s0", 100, 0) == []  # back off: bound reached
    deliver(ctl, got[:4], 0)
    assert [g for g, _ in ctl.take_batch()] == ["g0", "g1", "g2", "g3"]
    ctl.finish_step()
    assert len(ctl.grant("s0", 100, 1)) == 4  # one more step's worth per version
    assert ctl.metrics()["pipeline/issued"] == (eta + 2) * 4


def test_sync_mode_alternates_and_never_trains_stale():
    ctl, _ = make(eta=0, gps=2)
    for v in range(5):
        assert ctl.grant("s0", 8, sampler_version=v - 1) == [] or v == 0  # old weights: back off
        got = ctl.grant("s0", 8, sampler_version=v)
        assert len(got) == 2 and ctl.grant("s0", 8, v) == []
        deliver(ctl, got, v)
        assert len(ctl.take_batch()) == 2
        ctl.finish_step()
    m = ctl.metrics()
    assert m["pipeline/trained"] == 10 and m["pipeline/dropped_stale"] == 0 and m["pipeline/lost"] == 0


def test_sampler_without_weights_backs_off():
    ctl, _ = make()
    assert ctl.grant("s0", 4, sampler_version=-1) == []


def test_lease_expiry_reissues_with_next_attempt_and_first_arrival_wins():
    ctl, clock = make(eta=0, gps=2, lease=10.0)
    a, b = ctl.grant("s0", 2, 0)
    clock.t = 5.0
    assert ctl.expire_leases() == 0
    clock.t = 10.5
    assert ctl.expire_leases() == 2
    again = ctl.grant("s1", 2, 0)
    assert [(t.group_id, t.attempt) for t in again] == [("g0", 1), ("g1", 1)]
    assert again[0].prompt == a.prompt
    # the late original of g0 arrives first: trained; the re-issued copy is then a duplicate
    assert ctl.accept("g0", 0, 0, "late") == "accepted"
    assert ctl.accept("g0", 1, 0, "copy") == "duplicate"
    assert ctl.accept("g1", 1, 0, "b") == "accepted"
    batch = ctl.take_batch()
    assert dict(batch) == {"g0": "late", "g1": "b"}
    assert ctl.accept("g1", 0, 0, "very late") == "duplicate"  # after training too
    m = ctl.metrics()
    assert m["pipeline/duplicates"] == 2 and m["pipeline/reissued"] == 2 and m["pipeline/lease_expired"] == 2
    assert m["pipeline/trained"] == 2 and m["pipeline/lost"] == 0 and m["pipeline/issued"] == 2


def test_arrival_of_requeued_group_cancels_reissue():
    ctl, clock = make(eta=0, gps=1, lease=1.0)
    (t,) = ctl.grant("s0", 1, 0)
    clock.t = 2.0
    ctl.expire_leases()
    assert ctl.metrics()["pipeline/requeued"] == 1
    assert ctl.accept(t.group_id, t.attempt, 0, "x") == "accepted"
    assert ctl.metrics()["pipeline/requeued"] == 0 and ctl.grant("s0", 1, 0) == []


def test_unknown_ids_are_counted():
    ctl, _ = make()
    assert ctl.accept("g99", 0, 0, None) == "unknown"
    assert ctl.accept("bogus", 0, 0, None) == "unknown"
    assert ctl.metrics()["pipeline/unknown"] == 2


@pytest.mark.parametrize("gid", ["g\u00b2", "g1\u00b2", "g\u0661", "g\uff11", "g", "g-1", "g+1", "g 1", "g1 ", "g1\n",
                                 "g01", "g1_0", "G1", "gg1", ""])
def test_odd_ids_are_unknown_not_a_crash(gid):
    # str.isdigit() accepts superscripts and other scripts' digits, which int() refuses (ValueError killed the
    # learner's receive loop); anything group_id_of cannot have made is unknown.
    ctl, _ = make()
    ctl.grant("s0", 4, 0)
    assert ctl.accept(gid, 0, 0, None) == "unknown"
    m = ctl.metrics()
    assert m["pipeline/unknown"] == 1 and m["pipeline/in_flight"] == 4 and m["pipeline/lost"] == 0


def test_consumption_guard_requeues_too_stale_groups():
    ctl, _ = make(eta=1, gps=2)
    g = ctl.grant("s0", 8, 0)  # g0..g3 at version 0
    deliver(ctl, g[:2], 0)
    assert len(ctl.take_batch()) == 2
    ctl.finish_step()  # v = 1
    h = ctl.grant("s0", 8, 1)  # g4, g5 with version-1 weights
    deliver(ctl, h, 1)
    deliver(ctl, g[2:3], 0)  # g2 is one version old at v=1: accepted, but queued behind g4, g5
    assert [gid for gid, _ in ctl.take_batch()] == ["g4", "g5"]
    ctl.finish_step()  # v = 2: g2 (b=0) is now 2 versions old
    assert ctl.take_batch() is None
    m = ctl.metrics()
    assert m["pipeline/dropped_stale"] == 1 and m["pipeline/requeued"] == 1 and m["pipeline/lost"] == 0
    # arriving already stale is dropped at once
    assert ctl.accept(g[3].group_id, 0, 0, None) == "stale"
    assert ctl.metrics()["pipeline/dropped_stale"] == 2
    again = ctl.grant("s0", 8, 2)
    assert [(t.group_id, t.attempt) for t in again[:2]] == [("g2", 1), ("g3", 1)]


def test_grader_failure_requeues():
    ctl, _ = make(eta=0, gps=1)
    (t,) = ctl.grant("s0", 1, 0)
    assert ctl.accept(t.group_id, 0, 0, None, grader_failed=True) == "grader_error"
    (t2,) = ctl.grant("s0", 1, 0)
    assert (t2.group_id, t2.attempt) == ("g0", 1)
    assert ctl.metrics()["pipeline/grader_errors"] == 1


def test_release_holder_requeues_only_its_groups():
    ctl, _ = make(eta=1, gps=2)
    a = ctl.grant("s0", 2, 0)
    ctl.grant("s1", 2, 0)
    assert ctl.release_holder("s0") == 2
    assert [t.group_id for t in ctl.grant("s1", 8, 0)] == [t.group_id for t in a]


def test_new_groups_need_fresh_enough_weights():
    # eta=1, gps=2, v=0: g0..g1 (step 0) and g2..g3 (step 1) are admitted; at v=1 g4, g5 are expected in
    # step 2 and need weights >= 1; a sampler still at version 0 may take the requeued ones only.
    ctl, _ = make(eta=1, gps=2)
    g = ctl.grant("s0", 4, 0)
    deliver(ctl, g[:2], 0)
    ctl.take_batch()
    ctl.finish_step()
    assert ctl.grant("s0", 4, sampler_version=0) == []
    assert len(ctl.grant("s0", 4, sampler_version=1)) == 2


@pytest.mark.parametrize("seed", range(6))
def test_random_schedule_loses_and_duplicates_nothing(seed):
    """Random interleavings of grants, arrivals (late, duplicated, failed, stale), lease expiry, releases
    and steps: invariants hold after every event and each group id is trained at most once."""
    rng = random.Random(seed)
    eta = rng.choice([0, 1, 2])
    ctl, clock = make(eta=eta, gps=3, lease=5.0)
    sampler_version = {"s0": 0, "s1": 0}
    outstanding: list[tuple[str, int, int]] = []  # (group_id, attempt, behaviour version)
    trained: list[str] = []
    for _ in range(600):
        clock.t += rng.random()
        ev = rng.random()
        s = rng.choice(["s0", "s1"])
        if ev < 0.3:
            for t in ctl.grant(s, rng.randint(1, 4), sampler_version[s]):
                outstanding.append((t.group_id, t.attempt, sampler_version[s]))
        elif ev < 0.65 and outstanding:
            gid, att, b = outstanding.pop(rng.randrange(len(outstanding)))
            if rng.random() < 0.1:
                outstanding.append((gid, att, b))  # delivered twice
            ctl.accept(gid, att, b, gid, grader_failed=rng.random() < 0.05)
        elif ev < 0.7 and outstanding:
            outstanding.pop(rng.randrange(len(outstanding)))  # lost in a crash
        elif ev < 0.8:
            ctl.expire_leases()
        elif ev < 0.82:
            ctl.release_holder(s)
        elif ev < 0.9:
            sampler_version[s] = ctl.version  # weights arrive
        else:
            batch = ctl.take_batch()
            if batch:
                trained.extend(g for g, _ in batch)
                ctl.finish_step()
        m = ctl.metrics()
        assert m["pipeline/lost"] == 0
        assert len(ctl.ledger) <= (eta + 1) * 3
        assert m["pipeline/issued"] - m["pipeline/discarded"] <= (ctl.version + eta + 1) * 3
    assert len(trained) == len(set(trained)) == ctl.metrics()["pipeline/trained"]
    assert ctl.version > 3  # progress was made
    # liveness: with faults over, every group issued so far is trained (or discarded) within a few rounds
    # of lease expiry, re-issue and delivery; none stays stuck in the ledger
    before = ctl.metrics()["pipeline/issued"]
    for _ in range(8):
        clock.t += 6.0
        ctl.expire_leases()
        tickets = ctl.grant("s0", 100, ctl.version)
        deliver(ctl, tickets, ctl.version)
        while (batch := ctl.take_batch()) is not None:
            trained.extend(g for g, _ in batch)
            ctl.finish_step()
    assert all(seq >= before for seq in ctl.ledger), sorted(ctl.ledger)
    assert len(trained) == len(set(trained))


def test_checkpoint_round_trip_resumes_the_same_stream():
    cfg = Config()
    ctl, clock = make(eta=1, gps=2, source=make_prompt_source(cfg, "train"))
    g = ctl.grant("s0", 4, 0)
    deliver(ctl, g[:3], 0)  # g0,g1,g2 ready; g3 in flight
    ctl.take_batch()
    ctl.finish_step()
    clock.t = 11.0
    ctl.expire_leases()  # g3 requeued
    ctl.grant("s0", 1, 1)  # g3 re-issued, attempt 1
    state = json.loads(json.dumps(ctl.state_dict()))  # must be JSON-friendly
    ref_next = [t.prompt for t in ctl.grant("s0", 8, 1)]

    ctl2, _ = make(eta=1, gps=2, source=make_prompt_source(cfg, "train"))
    ctl2.load_state_dict(state)
    m = ctl2.metrics()
    assert ctl2.version == 1 and m["pipeline/trained"] == 2 and m["pipeline/lost"] == 0
    # g2 (was ready) and g3 (was in flight in the dead process: it may never return) are re-issued at once
    assert m["pipeline/requeued"] == 2 and m["pipeline/in_flight"] == 0
    got = ctl2.grant("s0", 8, 1)
    assert [(t.group_id, t.attempt) for t in got][:2] == [("g2", 1), ("g3", 2)]
    assert [t.prompt for t in got[2:]] == ref_next  # the dataset cursor resumed where it was
    assert ctl2.accept("g3", 1, 1, "x") == "accepted"   # the old attempt arrived after all: first one wins
    assert ctl2.accept("g3", 2, 1, "x") == "duplicate"


def test_discarded_prompts_give_their_admission_slot_back():
    # eta = 0, 2 groups per step: a prompt discarded after max_invalid failures (here by the grader) must
    # not shrink the window, or no batch of 2 could ever fill again
    ctl, _ = make(eta=0, gps=2)
    a, b = ctl.grant("s0", 2, 0)
    for attempt in range(3):
        want = "discarded" if attempt == 2 else "grader_error"
        assert ctl.accept(a.group_id, attempt, 0, None, grader_failed=True) == want
        if attempt < 2:
            (t,) = ctl.grant("s0", 2, 0)
            assert (t.group_id, t.attempt) == (a.group_id, attempt + 1)
    (c,) = ctl.grant("s0", 2, 0)   # the freed slot: a new prompt
    assert c.group_id == "g2"
    deliver(ctl, [b, c], 0)
    assert [g for g, _ in ctl.take_batch()] == ["g1", "g2"]
    m = ctl.metrics()
    assert m["pipeline/discarded"] == 1 and m["pipeline/grader_errors"] == 3 and m["pipeline/lost"] == 0


def test_rollouts_from_newer_weights_are_requeued():
    # after a learner restart rolled the version back, a group made with newer weights is not trained on
    ctl, _ = make(eta=1, gps=1)
    (t,) = ctl.grant("s0", 1, 0)
    assert ctl.accept(t.group_id, 0, 0, None, newest_version=3) == "future"
    m = ctl.metrics()
    assert m["pipeline/future"] == 1 and m["pipeline/requeued"] == 1 and m["pipeline/lost"] == 0


def test_invalid_rollouts_are_reissued_then_discarded():
    ctl, _ = make(eta=0, gps=2)
    ctl.grant("s0", 2, 0)
    assert ctl.accept("g0", 0, 0, None, invalid=True) == "invalid"
    (t,) = ctl.grant("s0", 2, 0)
    assert (t.group_id, t.attempt) == ("g0", 1)
    assert ctl.accept("g0", 1, 0, None, invalid=True) == "invalid"
    ctl.grant("s0", 2, 0)
    assert ctl.accept("g0", 2, 0, None, invalid=True) == "discarded"
    m = ctl.metrics()
    assert m["pipeline/discarded"] == 1 and m["pipeline/invalid"] == 3 and m["pipeline/lost"] == 0
    assert ctl.accept("g0", 0, 0, None) == "duplicate"
