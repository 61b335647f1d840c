"""The sampler asks the learner again for a version whose assembly stalled with chunks missing (lost while
its SUB was disconnected): otherwise it keeps serving old weights until the next publish, and with
max_staleness = 0 the run stalls."""

from __future__ import annotations

import asyncio

import torch
import zmq
import zmq.asyncio
from minirl_async.proto.codec import decode
from minirl_async.proto.messages import WeightsRequest
from minirl_async.proto.weights import WeightSender
from minirl_async.services import sampler as sampler_mod
from minirl_async.services.fakes import FAKE_TENSOR, FakeEngine
from minirl_async.services.sampler import SamplerService

from minirl_async.config import Config


def test_stalled_assembly_is_requested_again_rate_limited():
    cfg = Config()
    svc = SamplerService(cfg, 0)
    svc.engine = FakeEngine(cfg)
    svc.engine.version = 3
    svc.receiver.version = 3
    state = [(FAKE_TENSOR, torch.full((64,), 4.0)), ("model.other.weight", torch.ones(64))]
    chunks = list(WeightSender(256).publish(4, lambda: state))
    assert len(chunks) >= 2

    async def go() -> list[WeightsRequest]:
        ctx = zmq.asyncio.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://work")
        push.connect("inproc://work")
        try:
            assert not await svc.rerequest_stalled_weights(push)   # nothing being assembled
            for c in chunks[:-1]:   # the last chunk is lost
                svc.on_weights(c, None)
            assert svc.receiver.missing_chunks() == [len(chunks) - 1] and svc.pending is None
            assert not await svc.rerequest_stalled_weights(push)   # chunks still arriving, maybe
            svc.last_chunk_at -= sampler_mod.WEIGHTS_STALL_S + 1
            assert await svc.rerequest_stalled_weights(push)
            assert not await svc.rerequest_stalled_weights(push)   # at most once per WEIGHTS_STALL_S
            svc.last_weights_request -= sampler_mod.WEIGHTS_STALL_S + 1
            assert await svc.rerequest_stalled_weights(push)
            got = [decode(await asyncio.wait_for(pull.recv_multipart(copy=False), 5)) for _ in range(2)]
            assert all(isinstance(m, WeightsRequest) for m in got)
            return got  # type: ignore[return-value]
        finally:
            pull.close(linger=0)
            push.close(linger=0)
            ctx.term()

    got = asyncio.run(go())
    assert [(m.sampler_id, m.have_version) for m in got] == [("sampler-0", 3)] * 2
    assert svc.weights_rerequests == 2
    svc.on_weights(chunks[-1], None)   # the resent chunk completes the version
    assert svc.pending is not None and svc.pending.version == 4 and svc.receiver.missing_chunks() == []
