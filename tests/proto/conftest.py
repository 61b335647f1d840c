"""Fixtures of the wire-protocol tests: one valid instance of every message type, and free addresses."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import pytest
from minirl_async.proto.messages import (
    Heartbeat,
    PromptGroup,
    Response,
    RolloutGroup,
    ScoredGroup,
    Shutdown,
    WeightsRequest,
    WeightUpdate,
    WorkGrant,
    WorkRequest,
)


def make_rollout(rng: np.random.Generator, G: int = 3, P: int = 5, L: int = 2, K: int = 2,
                 routes: bool = True) -> RolloutGroup:
    responses = []
    for i in range(G):
        R = 4 + i
        responses.append(Response(
            response_ids=rng.integers(0, 1000, R).astype(np.int32),
            logprobs=-rng.random(R).astype(np.float32),
            versions=np.full(R, 7, np.int32),
            routes=rng.integers(0, 8, (P + R - 1, L, K)).astype(np.uint8) if routes else None,
            finish_reason=("stop", "length", "abort")[i % 3],
        ))
    return RolloutGroup(group_id="g-1", attempt=2, prompt_ids=rng.integers(0, 1000, P).astype(np.int32),
                        meta={"answer": "42", "task": {"kind": "arith", "digits": [1, 2]}, "w": 0.5, "n": None},
                        sampler_id="s0", responses=responses, timings={"generate_s": 1.25, "queue_s": 0.0})


def all_messages(seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    rollout = make_rollout(rng)
    return [
        WorkRequest(sampler_id="s0", free_slots=16, weight_version=-1),
        WorkGrant(groups=[PromptGroup(group_id=f"g{i}", attempt=i, prompt_ids=np.arange(3 + i, dtype=np.int32),
                                      meta={"answer": str(i)}, group_size=4) for i in range(2)]),
        WorkGrant(backoff_s=0.25),
        rollout,
        make_rollout(rng, routes=False),
        ScoredGroup.from_rollout(rollout, np.array([1.0, 0.0, 0.5], np.float32), {"grader": "exact"}, ["timeout"]),
        WeightUpdate(version=3, publish_id=(1 << 64) - 1, chunk_index=1, num_chunks=2, num_tensors=5, blob=bytes(range(256)) * 3,
                     checksum=(1 << 64) - 1, checksum_algo="crc32", fp8=True, fp8_block=128),
        WeightUpdate(version=4, publish_id=7, chunk_index=0, num_chunks=1, num_tensors=2,
                     blob=[bytes(range(256)), np.arange(5000, dtype=np.uint8).data, bytearray(b"tail")],   # segments
                     checksum=1, checksum_algo="xxh3_64"),
        WeightsRequest(sampler_id="s1", have_version=2),
        Heartbeat(sender="grader-0", role="grader", seq=9, time_s=1.7e9),
        Shutdown(sender="launcher", reason="done"),
    ]


@pytest.fixture
def messages() -> list:
    return all_messages()


def free_tcp() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def tcp_addr() -> str:
    return free_tcp()


@pytest.fixture
def ipc_addr(tmp_path_factory: pytest.TempPathFactory) -> str:
    # ipc paths are limited to ~100 characters: use a short folder.
    return f"ipc:///tmp/minirl-{uuid.uuid4().hex[:12]}.sock"


@pytest.fixture
def rollout_factory():
    return make_rollout
