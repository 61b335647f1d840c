"""Round trips of every message type through the codec (values and dtypes identical), zero-copy decoding,
and the invariants the message types enforce when a service builds one."""

from __future__ import annotations

import dataclasses

import msgpack
import numpy as np
import pytest
import torch
from minirl_async.proto.codec import decode, encode, messages_equal
from minirl_async.proto.messages import (
    MESSAGE_TYPES,
    PROTO_VERSION,
    ProtocolError,
    Response,
    RolloutGroup,
    ScoredGroup,
    WorkGrant,
    as_torch,
)


def _to_bytes(frames):
    """What the far side of a socket sees: independent bytes objects."""
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames]


def test_every_type_round_trips_with_identical_values_and_dtypes(messages):
    assert {type(m).TYPE for m in messages} == set(MESSAGE_TYPES)
    for msg in messages:
        frames = encode(msg)
        header = msgpack.unpackb(frames[0], raw=False)
        assert header["proto"] == PROTO_VERSION and header["type"] == msg.TYPE
        back = decode(_to_bytes(frames))
        assert type(back) is type(msg)
        assert messages_equal(msg, back), msg.TYPE
        for f in dataclasses.fields(msg):
            a, b = getattr(msg, f.name), getattr(back, f.name)
            if isinstance(a, np.ndarray):
                assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


def test_nested_arrays_and_scalars_exact(rollout_factory):
    g = rollout_factory(np.random.default_rng(3))
    back = decode(_to_bytes(encode(g)))
    for r0, r1 in zip(g.responses, back.responses):
        assert r1.logprobs.dtype == np.float32 and r1.versions.dtype == np.int32 and r1.routes.dtype == np.uint8
        assert r1.logprobs.tobytes() == r0.logprobs.tobytes()  # bit-exact floats
        assert r1.routes.shape == (g.prompt_ids.shape[0] + r0.length - 1, 2, 2)
        assert r1.finish_reason == r0.finish_reason
    assert back.meta == g.meta and back.timings == g.timings and back.attempt == 2


def test_decoded_arrays_view_the_frames_without_copy(rollout_factory):
    g = rollout_factory(np.random.default_rng(4))
    frames = [bytearray(memoryview(f).cast("B")) for f in encode(g)]
    back = decode(frames)
    lp = back.responses[0].logprobs
    desc = msgpack.unpackb(bytes(frames[0]), raw=False)["responses"][0]["logprobs"]
    frames[desc["frame"]][:4] = np.float32(-9.5).tobytes()  # write into the received frame ...
    assert lp[0] == np.float32(-9.5)  # ... and the decoded array sees it: no copy was made
    t = as_torch(lp)
    assert t.dtype == torch.float32 and t.data_ptr() == lp.ctypes.data


def test_large_arrays_are_sent_as_themselves(rollout_factory):
    g = rollout_factory(np.random.default_rng(5))
    frames = encode(g)
    assert any(f is g.responses[0].routes for f in frames)  # zero-copy send: the array object is the frame


def test_constructors_accept_lists_and_torch_tensors():
    r = Response(response_ids=torch.tensor([1, 2, 3]), logprobs=[-0.5, -1.0, -2.0],
                 versions=torch.tensor([0, 0, 1], dtype=torch.int64), routes=None, finish_reason="length")
    assert r.response_ids.dtype == np.int32 and r.logprobs.dtype == np.float32 and r.versions.dtype == np.int32
    assert r.logprobs.tolist() == [-0.5, -1.0, -2.0]
    r2 = Response(response_ids=[1], logprobs=torch.tensor([-0.5], dtype=torch.bfloat16), versions=[0],
                  finish_reason="stop")
    assert r2.logprobs.dtype == np.float32 and r2.logprobs.tolist() == [-0.5]


def test_scored_group_keeps_rollout_fields(rollout_factory):
    g = rollout_factory(np.random.default_rng(6))
    s = ScoredGroup.from_rollout(g, [1, 0, 1])
    assert s.rewards.dtype == np.float32 and messages_equal(s.rollout(), g)
    assert s.group_size == 3 and s.min_version == 7 and s.max_version == 7
    assert s.num_response_tokens == 4 + 5 + 6


@pytest.mark.parametrize("mutate, match", [
    (lambda g: setattr(g.responses[0], "logprobs", g.responses[0].logprobs[:-1]), "share one length"),
    (lambda g: setattr(g.responses[1], "routes", g.responses[1].routes[:-1]), "prompt\\+response-1"),
    (lambda g: setattr(g.responses[2], "finish_reason", "eos"), "finish_reason"),
    (lambda g: setattr(g.responses[0], "routes", None), "some responses only"),
    (lambda g: setattr(g, "responses", []), "no responses"),
    (lambda g: setattr(g, "group_id", ""), "group_id"),
])
def test_encode_refuses_broken_invariants(rollout_factory, mutate, match):
    g = rollout_factory(np.random.default_rng(7))
    mutate(g)
    with pytest.raises(ProtocolError, match=match):
        encode(g)


def test_scored_group_needs_one_reward_per_response(rollout_factory):
    s = ScoredGroup.from_rollout(rollout_factory(np.random.default_rng(8)), [1.0, 0.0])
    with pytest.raises(ProtocolError, match="2 rewards for 3 responses"):
        encode(s)


def test_work_grant_is_groups_or_backoff():
    with pytest.raises(ProtocolError, match="either groups or a backoff"):
        encode(WorkGrant())


def test_the_wire_type_not_the_subclass_decides_the_schema(rollout_factory):
    """ScoredGroup subclasses RolloutGroup: each decodes as exactly its own type, and neither's frames are
    accepted under the other's name (a RolloutGroup lacks the rewards, a ScoredGroup has fields too many)."""
    g = rollout_factory(np.random.default_rng(9))
    s = ScoredGroup.from_rollout(g, np.array([1.0, 0.0, 0.5], np.float32))
    for msg in (g, s):
        assert type(decode(_to_bytes(encode(msg)))) is type(msg)
    for msg, other, match in [(g, ScoredGroup, "missing field"), (s, RolloutGroup, "unexpected field")]:
        frames = _to_bytes(encode(msg))
        header = msgpack.unpackb(frames[0], raw=False)
        header["type"] = other.TYPE
        with pytest.raises(ProtocolError, match=f"{other.__name__}: {match}"):
            decode([msgpack.packb(header, use_bin_type=True), *frames[1:]])


def _response(**kw):
    base = {"response_ids": [1, 2], "logprobs": [-0.5, -1.0], "versions": [0, 0], "finish_reason": "stop"}
    return Response(**{**base, **kw})


@pytest.mark.parametrize("field, value, match", [
    ("routes", torch.tensor([300, 5], dtype=torch.int64).reshape(1, 1, 2).expand(3, 1, 2), None),
    ("routes", np.full((3, 1, 2), 2**40, np.int64), "routes"),
    ("response_ids", np.array([5, 2**31 + 5], np.int64), "response_ids"),
    ("response_ids", torch.tensor([1, -(2**31) - 1]), "response_ids"),
    ("versions", [0, 2**32], "versions"),
    ("response_ids", [1.0, 2.5], "response_ids"),
    ("response_ids", [1.0, float("nan")], "response_ids"),
])
def test_constructors_never_wrap_or_truncate_values(field, value, match):
    """Values that do not fit the field's dtypes raise ProtocolError naming the field; values that fit a
    wider allowed dtype keep their values (routes of 300 experts become uint16, not uint8 44)."""
    if match is None:
        r = _response(**{field: value})
        assert r.routes is not None and r.routes.dtype == np.uint16
        assert r.routes[0, 0].tolist() == [300, 5]
        return
    with pytest.raises(ProtocolError, match=match):
        _response(**{field: value})


def test_constructors_convert_values_that_fit():
    r = _response(response_ids=np.array([0, 2**31 - 1], np.int64), versions=np.array([3, 4], np.uint64),
                  routes=np.array([[[255, 0]]] * 3, np.int64), logprobs=np.array([-0.5, -1.0], np.float64))
    assert r.response_ids.dtype == np.int32 and r.response_ids.tolist() == [0, 2**31 - 1]
    assert r.versions.dtype == np.int32 and r.versions.tolist() == [3, 4]
    assert r.routes is not None and r.routes.dtype == np.uint8 and r.routes[0, 0].tolist() == [255, 0]
    assert _response(response_ids=[1.0, 2.0]).response_ids.tolist() == [1, 2]
    empty = Response(response_ids=[], logprobs=[], versions=[], routes=np.zeros((0, 1, 2)), finish_reason="abort")
    assert empty.response_ids.dtype == np.int32 and empty.routes is not None and empty.routes.dtype == np.uint8
    neg = _response(routes=np.full((3, 1, 2), -1, np.int64))  # kept as -1 (int16), so validate() can refuse it
    assert neg.routes is not None and neg.routes.dtype == np.int16 and int(neg.routes.min()) == -1
