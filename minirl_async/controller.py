"""The controller of the learner hub: dataset cursor, admission of new prompt groups, the ledger of issued
groups with leases, deduplication, the consumption guard and the counters that prove nothing is lost.

Pure logic (no sockets): the learner service calls it from its event loop.

    ctl = Controller(make_prompt_source(cfg, "train"), StalenessTracker(cfg.staleness, cfg.num_minibatches),
                     groups_per_step=cfg.learner.groups_per_step, lease_s=cfg.staleness.lease_s)
    tickets = ctl.grant("sampler-0", max_groups=8, sampler_version=0)      # WorkRequest -> WorkGrant
    ctl.accept(group_id, attempt, oldest_version, payload)                  # ScoredGroup arrives
    batch = ctl.take_batch()            # groups_per_step payloads once enough fresh ones are ready, else None
    ctl.finish_step()                   # version += 1 after the train step
    ctl.expire_leases()                 # periodically: groups whose lease ended go back to the queue

Life of a group (id `g<seq>`, seq = 0, 1, 2, ... in dataset order):
    new -> in_flight (granted, lease running) -> ready (first ScoredGroup arrived) -> trained (removed)
    in_flight --lease ended / sampler restarted / grader failed--> requeued --grant--> in_flight (attempt+1)
    ready --consumption guard (too stale)--> requeued
    in_flight --failed `max_invalid` times (engine abort, empty response, grader error)--> discarded
Only groups that are in flight or requeued accept an arrival; anything else is a duplicate (counted,
dropped). A group is trained at most once and never dropped without being re-issued, so at all times
    issued == trained + discarded + in_flight + requeued + ready     (`pipeline/lost` = the difference = 0)
where `discarded` counts only prompts that failed `max_invalid` times (logged). A discarded prompt gives its
admission slot back (it will never be trained: counting it would shrink the window for good, and after
eta * groups_per_step + 1 discards no batch could ever fill). So the bound reads: at version v at most
(v + eta + 1) * groups_per_step groups issued and not discarded, v * groups_per_step trained, and the ledger
never holds more than (eta + 1) * groups_per_step: memory is bounded.
After a learner restart the groups that were in flight are re-issued at once: the dead process's
samplers and graders may never return them, and waiting out a lease (an hour on GPU configs) stalls the
run; if the old rollouts do arrive, the first arrival wins as always.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from minirl_async.staleness import StalenessTracker
from minirl_async.tasks.base import Prompt, PromptSource

IN_FLIGHT, REQUEUED, READY = "in_flight", "requeued", "ready"


@dataclass
class Ticket:
    """One prompt group handed to a sampler."""

    group_id: str
    attempt: int
    prompt: Prompt


@dataclass
class _Entry:
    seq: int
    prompt: Prompt
    attempt: int
    state: str
    deadline: float = 0.0
    holder: str = ""
    oldest_version: int = 0
    payload: Any = None


def group_id_of(seq: int) -> str:
    return f"g{seq}"


_GROUP_ID = re.compile(r"g(0|[1-9][0-9]*)")


def seq_of(group_id: str) -> int | None:
    """The seq of an id `group_id_of` made, else None (ASCII digits only: str.isdigit() accepts "²", which
    int() refuses, and "g01" would alias "g1")."""
    m = _GROUP_ID.fullmatch(group_id) if isinstance(group_id, str) else None
    return int(m.group(1)) if m else None


class Controller:
    """Issues prompt groups under the admission bound and hands whole fresh batches to the trainer."""

    def __init__(self, source: PromptSource, tracker: StalenessTracker, groups_per_step: int, lease_s: float,
                 clock: Callable[[], float] = time.monotonic, max_invalid: int = 3):
        if groups_per_step < 1:
            raise ValueError(f"groups_per_step must be >= 1 (got {groups_per_step})")
        self.source, self.tracker, self.groups_per_step, self.lease_s = source, tracker, groups_per_step, lease_s
        self.clock, self.max_invalid = clock, max_invalid
        self.version = 0
        self.next_seq = 0
        self.ledger: dict[int, _Entry] = {}
        self.requeue: list[int] = []  # seqs, oldest first: re-issued before any new group
        self.ready: list[int] = []  # seqs in arrival order
        self.counters = {"grants": 0, "reissued": 0, "trained": 0, "dropped_stale": 0, "grader_errors": 0,
                         "lease_expired": 0, "duplicates": 0, "unknown": 0, "released": 0, "future": 0,
                         "invalid": 0, "discarded": 0}
        self.failures: dict[int, int] = {}  # seq -> failed arrivals (invalid rollouts or grader errors)

    # ---- granting ------------------------------------------------------------------------------------

    def _fresh_enough(self, seq: int | None, sampler_version: int) -> bool:
        """Would a group generated now with `sampler_version` weights still pass the guard when consumed?

        A new group of index seq is expected in the batch of step (seq - discarded) // groups_per_step; a
        re-issued one (seq None) in the current step. Granting a sampler whose weights are already too old only produces
        work the consumption guard will throw away, so it backs off until the new weights reach it.
        """
        admitted = None if seq is None else seq - self.counters["discarded"]   # discards gave their slots back
        expected_step = self.version if admitted is None else max(self.version, admitted // self.groups_per_step)
        return sampler_version >= 0 and not self.tracker.is_stale(sampler_version, expected_step)

    def grant(self, holder: str, max_groups: int, sampler_version: int) -> list[Ticket]:
        """Up to `max_groups` tickets for a sampler holding weights `sampler_version` (-1 = none yet).

        Requeued groups go first (they are already counted as issued); new groups only while the admission
        bound allows. An empty list means 'back off'.
        """
        out: list[Ticket] = []
        now = self.clock()
        while len(out) < max_groups and self.requeue and self._fresh_enough(None, sampler_version):
            e = self.ledger[self.requeue.pop(0)]
            e.attempt += 1
            e.state, e.deadline, e.holder = IN_FLIGHT, now + self.lease_s, holder
            self.counters["reissued"] += 1
            out.append(Ticket(group_id_of(e.seq), e.attempt, e.prompt))
        limit = self.tracker.admission_limit(self.version, self.groups_per_step) + self.counters["discarded"]
        while len(out) < max_groups and self.next_seq + 1 <= limit and self._fresh_enough(self.next_seq,
                                                                                           sampler_version):
            seq = self.next_seq
            self.next_seq += 1
            e = _Entry(seq, next(self.source), 0, IN_FLIGHT, now + self.lease_s, holder)
            self.ledger[seq] = e
            out.append(Ticket(group_id_of(seq), 0, e.prompt))
        self.counters["grants"] += len(out)
        assert len(self.ledger) <= (self.tracker.eta + 1) * self.groups_per_step, len(self.ledger)
        return out

    def _requeue(self, e: _Entry) -> None:
        e.state, e.payload, e.holder = REQUEUED, None, ""
        self.requeue.append(e.seq)

    def expire_leases(self) -> int:
        """Requeue in-flight groups whose lease ended; returns how many."""
        now = self.clock()
        expired = [e for e in self.ledger.values() if e.state == IN_FLIGHT and e.deadline < now]
        for e in sorted(expired, key=lambda e: e.seq):
            self._requeue(e)
        self.counters["lease_expired"] += len(expired)
        return len(expired)

    def release_holder(self, holder: str) -> int:
        """A sampler (re)started and holds nothing: requeue what it was leased without waiting for the lease.

        If one of those groups was already past the sampler (at a grader), its first arrival still wins and
        the re-issued copy becomes a counted duplicate: nothing lost, nothing trained twice.
        """
        mine = [e for e in self.ledger.values() if e.state == IN_FLIGHT and e.holder == holder]
        for e in sorted(mine, key=lambda e: e.seq):
            self._requeue(e)
        self.counters["released"] += len(mine)
        return len(mine)

    # ---- arrivals ------------------------------------------------------------------------------------

    def accept(self, group_id: str, attempt: int, oldest_version: int, payload: Any,
               grader_failed: bool = False, newest_version: int | None = None, invalid: bool = False) -> str:
        """Record a ScoredGroup. Returns 'accepted', 'duplicate', 'unknown', 'grader_error', 'stale',
        'future', 'invalid' or 'discarded'.

        `invalid`: the rollouts cannot be trained on (an engine abort, an empty response); `grader_failed`:
        the grader's failure policy dropped the group. The prompt is issued again; after `max_invalid` such
        failures it is discarded for good (counted: a prompt the engine or the grader refuses every time
        would otherwise circulate forever, ahead of new prompts).

        The first arrival of a group id wins whatever its attempt (an earlier attempt that was only late is
        as good as the re-issued one, whose arrival will then be the duplicate).
        """
        seq = seq_of(group_id)
        if seq is None or seq >= self.next_seq:
            self.counters["unknown"] += 1  # e.g. issued by a learner incarnation rolled back by a restart
            return "unknown"
        e = self.ledger.get(seq)
        if e is None or e.state == READY:
            self.counters["duplicates"] += 1
            return "duplicate"
        if e.state == REQUEUED:
            self.requeue.remove(seq)
        if invalid or grader_failed:
            self.counters["invalid" if invalid else "grader_errors"] += 1
            n = self.failures[seq] = self.failures.get(seq, 0) + 1
            if n >= self.max_invalid:
                del self.ledger[seq]
                self.failures.pop(seq)
                self.counters["discarded"] += 1
                return "discarded"
            self._requeue(e)
            return "invalid" if invalid else "grader_error"
        if newest_version is not None and newest_version > self.version:
            # Weights newer than ours: made by a learner incarnation that a restart rolled back. Not ours
            # to train on (the lag would be negative); the prompt is issued again.
            self.counters["future"] += 1
            self._requeue(e)
            return "future"
        if self.tracker.is_stale(oldest_version, self.version):  # it can only get staler: drop it now
            self.counters["dropped_stale"] += 1
            self._requeue(e)
            return "stale"
        e.state, e.payload, e.oldest_version, e.holder = READY, payload, oldest_version, ""
        self.ready.append(seq)
        return "accepted"

    # ---- consumption ---------------------------------------------------------------------------------

    def _guard(self) -> None:
        for seq in list(self.ready):
            e = self.ledger[seq]
            if self.tracker.is_stale(e.oldest_version, self.version):
                self.ready.remove(seq)
                self.counters["dropped_stale"] += 1
                self._requeue(e)

    def batch_ready(self) -> bool:
        self._guard()
        return len(self.ready) >= self.groups_per_step

    def take_batch(self) -> list[tuple[str, Any]] | None:
        """(group_id, payload) of groups_per_step fresh groups for the step at `self.version`, or None.

        The consumption guard runs first: groups whose oldest token is older than v - eta are requeued.
        """
        if not self.batch_ready():
            return None
        seqs, self.ready = self.ready[: self.groups_per_step], self.ready[self.groups_per_step:]
        out = []
        for seq in seqs:
            e = self.ledger.pop(seq)
            self.failures.pop(seq, None)
            out.append((group_id_of(seq), e.payload))
        self.counters["trained"] += len(seqs)
        return out

    def finish_step(self) -> None:
        """The step consuming the last batch is done: version += 1 (the admission bound moves on)."""
        self.version += 1

    # ---- accounting ----------------------------------------------------------------------------------

    def metrics(self) -> dict[str, int]:
        states = [e.state for e in self.ledger.values()]
        in_flight, requeued, ready = states.count(IN_FLIGHT), states.count(REQUEUED), states.count(READY)
        c = self.counters
        return {
            "pipeline/dropped_stale": c["dropped_stale"],
            "pipeline/reissued": c["reissued"],
            "pipeline/grader_errors": c["grader_errors"],
            "pipeline/duplicates": c["duplicates"],
            "pipeline/unknown": c["unknown"],
            "pipeline/lease_expired": c["lease_expired"],
            "pipeline/released": c["released"],
            "pipeline/future": c["future"],
            "pipeline/invalid": c["invalid"],
            "pipeline/discarded": c["discarded"],
            "pipeline/issued": self.next_seq,
            "pipeline/trained": c["trained"],
            "pipeline/in_flight": in_flight,
            "pipeline/requeued": requeued,
            "pipeline/ready": ready,
            "pipeline/lost": self.next_seq - c["trained"] - c["discarded"] - in_flight - requeued - ready,
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to resume the same stream (JSON-friendly). Every unfinished group is requeued on
        load (ready payloads are not saved; in-flight ones may never come back, see the module docstring)."""
        entries = [{"seq": e.seq, "prompt": asdict(e.prompt), "attempt": e.attempt, "failures": self.failures.get(e.seq, 0)}
                   for e in sorted(self.ledger.values(), key=lambda e: e.seq)]
        return {"version": self.version, "next_seq": self.next_seq, "entries": entries,
                "counters": dict(self.counters), "source": self.source.state_dict(),
                "tracker": self.tracker.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore; every unfinished group is requeued, oldest first."""
        self.version, self.next_seq = int(state["version"]), int(state["next_seq"])
        self.counters = {**self.counters, **state["counters"]}
        self.source.load_state_dict(state["source"])
        self.tracker.load_state_dict(state["tracker"])
        self.ledger, self.requeue, self.ready, self.failures = {}, [], [], {}
        for d in state["entries"]:
            e = _Entry(int(d["seq"]), Prompt(**d["prompt"]), int(d["attempt"]), REQUEUED)
            self.ledger[e.seq] = e
            self.requeue.append(e.seq)
            if d.get("failures"):
                self.failures[e.seq] = int(d["failures"])
