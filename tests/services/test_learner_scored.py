"""The learner hub's handling of arriving ScoredGroups: a group the trainer would refuse (token ids outside
the vocab, expert ids outside the model) is refused on arrival, re-issued, then discarded, and never reaches
a batch (train_step would raise BatchError and end the learner)."""

from __future__ import annotations

import numpy as np
import pytest
from minirl_async.proto.messages import Response, ScoredGroup
from minirl_async.services.learner import LearnerHub
from minirl_async.services.real import RealTrainer

from minirl_async.config import Config

VOCAB, EXPERTS = 64, 8


@pytest.fixture
def hub(tmp_path):
    cfg = Config()
    cfg.run.dir = str(tmp_path / "run")
    cfg.algo.group_size = 2
    cfg.learner.groups_per_step = 1
    cfg.learner.minibatch_groups = 1
    cfg.model.arch.vocab_size = VOCAB
    h = LearnerHub(cfg)
    h.trainer = RealTrainer(cfg, tmp_path / "run", "")   # a tiny model built from model.arch
    m = h.trainer.impl.mcfg
    assert (m.vocab_size, m.num_experts) == (VOCAB, EXPERTS)
    yield h
    h.runlog.close()


def scored(hub, gid, attempt=0, token=5, expert=1):
    m = hub.trainer.impl.mcfg
    p, r = 2, 3
    routes = np.full((p + r - 1, m.num_moe_layers, m.num_experts_per_tok), expert, np.uint8)
    responses = [Response(response_ids=np.array([4, token, 6], np.int32), logprobs=np.full(r, -0.5, np.float32),
                          versions=np.zeros(r, np.int32), routes=routes, finish_reason="stop")
                 for _ in range(hub.cfg.algo.group_size)]
    return ScoredGroup(group_id=gid, attempt=attempt, prompt_ids=np.array([1, 7], np.int32), meta={},
                       sampler_id="s", responses=responses, rewards=np.array([1.0, 0.0], np.float32))


def test_valid_group_is_accepted(hub):
    (t,) = hub.controller.grant("s0", 1, 0)
    hub.on_scored(scored(hub, t.group_id), None)
    assert [gid for gid, _ in hub.controller.take_batch()] == [t.group_id]
    assert hub.invalid_reasons == {}


@pytest.mark.parametrize("bad", [{"token": VOCAB}, {"expert": EXPERTS}])
def test_group_the_trainer_would_refuse_is_reissued_then_discarded(hub, bad):
    ctl = hub.controller
    (t,) = ctl.grant("s0", 1, 0)
    for attempt in range(ctl.max_invalid):
        hub.on_scored(scored(hub, t.group_id, attempt, **bad), None)
        assert ctl.take_batch() is None   # never trained on
        again = ctl.grant("s0", 1, 0)
        if attempt < ctl.max_invalid - 1:
            assert [(x.group_id, x.attempt) for x in again] == [(t.group_id, attempt + 1)]
    m = ctl.metrics()
    assert m["pipeline/invalid"] == ctl.max_invalid and m["pipeline/discarded"] == 1 and m["pipeline/lost"] == 0
    assert hub.invalid_reasons == {"refused by the trainer": ctl.max_invalid}
    events = (hub.run_dir / "events.log").read_text()
    assert f"group {t.group_id} attempt 0 invalid: refused by the trainer:" in events
    assert f"group {t.group_id} attempt {ctl.max_invalid - 1} discarded:" in events


def test_without_trainer_checks_only_the_wire_rules(hub):
    ctl = hub.controller
    (t,) = ctl.grant("s0", 1, 0)
    g, out_of_vocab = scored(hub, t.group_id), scored(hub, t.group_id, 1, token=VOCAB)
    hub.trainer = None   # e.g. the fake (no model to check against)
    g.responses[1].finish_reason = "abort"
    hub.on_scored(g, None)
    assert ctl.metrics()["pipeline/invalid"] == 1 and hub.invalid_reasons == {"engine abort": 1}
    assert [(x.group_id, x.attempt) for x in ctl.grant("s0", 1, 0)] == [(t.group_id, 1)]
    hub.on_scored(out_of_vocab, None)   # nothing to check the vocab against
    assert [gid for gid, _ in ctl.take_batch()] == [t.group_id]


def test_a_sampler_left_behind_is_sent_the_last_version(hub, monkeypatch):
    # A sampler that lost every chunk of a stream keeps reporting its old version: after BEHIND_RESEND_S
    # the hub queues a point-to-point resend (as for a WeightsRequest), at most once per BEHIND_RESEND_S.
    import types

    import minirl_async.services.learner as mod
    from minirl_async.proto.messages import WorkRequest

    now = {"t": 1000.0}
    monkeypatch.setattr(mod.time, "monotonic", lambda: now["t"])
    requests, served = [], []
    publisher = types.SimpleNamespace(sender=types.SimpleNamespace(last_version=5),
                                      on_request=lambda r: requests.append((r.sampler_id, r.have_version)))
    monkeypatch.setattr(hub, "_serve_soon", lambda p: served.append(p))

    def work(at, version, sampler="s0"):
        now["t"] = 1000.0 + at
        hub._resend_if_left_behind(publisher, WorkRequest(sampler_id=sampler, free_slots=2, weight_version=version))

    work(0, 3)
    work(mod.BEHIND_RESEND_S - 1, 3)
    work(0.5, 5, "s1")                               # up to date: nothing
    work(1, -1, "s2")                                # no weights yet: it asks by itself
    assert requests == []
    work(mod.BEHIND_RESEND_S + 1, 3)
    assert requests == [("s0", 3)] and served == [publisher]
    work(mod.BEHIND_RESEND_S + 10, 3)                # rate-limited
    assert len(requests) == 1
    work(2 * mod.BEHIND_RESEND_S + 2, 3)
    assert requests == [("s0", 3)] * 2
    work(2 * mod.BEHIND_RESEND_S + 3, 5)             # caught up: the clock starts over
    work(2 * mod.BEHIND_RESEND_S + 4, 4)
    assert len(requests) == 2
    assert "resend v5 to s0 (it reports v3)" in (hub.run_dir / "events.log").read_text()
