"""Every kind of bad input of issue #4 is its own test: decode raises ProtocolError with a clear message."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import torch
from minirl_async.proto.codec import decode, encode
from minirl_async.proto.messages import PROTO_VERSION, ProtocolError, WeightUpdate
from minirl_async.proto.weights import WeightReceiver, WeightSender


def _frames(msg):
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in encode(msg)]


def _with_header(frames, edit):
    header = msgpack.unpackb(frames[0], raw=False)
    edit(header)
    return [msgpack.packb(header, use_bin_type=True), *frames[1:]]


@pytest.fixture
def rollout_frames(rollout_factory):
    return _frames(rollout_factory(np.random.default_rng(0)))


def test_garbage_bytes():
    with pytest.raises(ProtocolError, match="not a valid msgpack header"):
        decode([b"\xc1" + os.urandom(64)])  # 0xc1 is never valid msgpack
    # random bytes fail in many ways (an ext type, a scalar with extra data, a truncated map ...): each one
    # must still be a ProtocolError
    rng = np.random.default_rng(0)
    for _ in range(500):
        with pytest.raises(ProtocolError):
            decode([rng.bytes(int(rng.integers(1, 128)))])


def test_truncated_header_bytes(rollout_frames):
    with pytest.raises(ProtocolError, match="not a valid msgpack header"):
        decode([rollout_frames[0][:-3], *rollout_frames[1:]])


def test_truncated_multipart(rollout_frames):
    with pytest.raises(ProtocolError, match="frame index .* outside"):
        decode(rollout_frames[:-1])


def test_empty_multipart():
    with pytest.raises(ProtocolError, match="empty multipart"):
        decode([])


def test_header_not_a_map():
    with pytest.raises(ProtocolError, match="header must be a msgpack map"):
        decode([msgpack.packb([PROTO_VERSION, "WorkRequest"])])


def test_unknown_type():
    with pytest.raises(ProtocolError, match="unknown message type 'Pickle'"):
        decode([msgpack.packb({"proto": PROTO_VERSION, "type": "Pickle"})])


def test_wrong_protocol_version_names_both(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h.update(proto=PROTO_VERSION + 1))
    with pytest.raises(ProtocolError, match=f"peer speaks proto {PROTO_VERSION + 1}, this side speaks {PROTO_VERSION}"):
        decode(bad)


def test_missing_field(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h.pop("sampler_id"))
    with pytest.raises(ProtocolError, match=r"missing field\(s\) \['sampler_id'\]"):
        decode(bad)


def test_missing_nested_field(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h["responses"][1].pop("finish_reason"))
    with pytest.raises(ProtocolError, match=r"Response at responses.1: missing field\(s\) \['finish_reason'\]"):
        decode(bad)


def test_extra_field(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h.update(surprise=1))
    with pytest.raises(ProtocolError, match=r"unexpected field\(s\) \['surprise'\]"):
        decode(bad)


def test_wrong_scalar_type(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h.update(attempt="2"))
    with pytest.raises(ProtocolError, match="field 'attempt' must be int"):
        decode(bad)


def test_dtype_not_on_whitelist(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h["responses"][0]["logprobs"].update(dtype="object"))
    with pytest.raises(ProtocolError, match="dtype 'object' is not on the whitelist"):
        decode(bad)


def test_dtype_not_allowed_for_field(rollout_frames):
    def edit(h):
        d = h["responses"][0]["logprobs"]
        d.update(dtype="int32")  # same byte size as float32: only the field's own dtype rule can catch it
    with pytest.raises(ProtocolError, match="dtype int32 not allowed here; expected one of \\['float32'\\]"):
        decode(_with_header(rollout_frames, edit))


def test_shape_frame_length_mismatch(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h["responses"][0]["logprobs"]["shape"].__setitem__(0, 99))
    with pytest.raises(ProtocolError, match="needs 396 bytes but frame"):
        decode(bad)


def test_wrong_rank(rollout_frames):
    def edit(h):
        d = h["prompt_ids"]
        d["shape"] = [1, d["shape"][0]]
    with pytest.raises(ProtocolError, match="expected 1 dimensions"):
        decode(_with_header(rollout_frames, edit))


def test_frame_referenced_twice(rollout_frames):
    def edit(h):
        h["responses"][0]["versions"]["frame"] = h["responses"][0]["response_ids"]["frame"]
    with pytest.raises(ProtocolError, match="referenced twice"):
        decode(_with_header(rollout_frames, edit))


def test_unreferenced_extra_frame(rollout_frames):
    with pytest.raises(ProtocolError, match="not referenced by the header"):
        decode([*rollout_frames, b"smuggled"])


def test_nan_where_finite_required(rollout_factory):
    g = rollout_factory(np.random.default_rng(1))
    frames = _frames(g)
    header = msgpack.unpackb(frames[0], raw=False)
    i = header["responses"][2]["logprobs"]["frame"]
    lp = np.frombuffer(frames[i], np.float32).copy()
    lp[1] = np.nan
    frames[i] = lp.tobytes()
    with pytest.raises(ProtocolError, match="responses.2.logprobs: contains NaN or inf"):
        decode(frames)


def test_inf_reward(rollout_factory):
    from minirl_async.proto.messages import ScoredGroup

    s = ScoredGroup.from_rollout(rollout_factory(np.random.default_rng(2)), [1.0, 0.0, 0.0])
    frames = _frames(s)
    i = msgpack.unpackb(frames[0], raw=False)["rewards"]["frame"]
    frames[i] = np.array([1.0, np.inf, 0.0], np.float32).tobytes()
    with pytest.raises(ProtocolError, match="rewards: contains NaN or inf"):
        decode(frames)


def test_oversize_message(rollout_frames):
    total = sum(len(f) for f in rollout_frames)
    with pytest.raises(ProtocolError, match=f"message of {total} bytes exceeds the limit of 100 bytes"):
        decode(rollout_frames, max_bytes=100)


def test_msgpack_extension_types_refused():
    header = msgpack.packb({"proto": PROTO_VERSION, "type": "Shutdown", "sender": msgpack.ExtType(5, b"x"),
                            "reason": ""})
    with pytest.raises(ProtocolError, match="extension type 5"):
        decode([header])


def test_broken_invariant_on_decode(rollout_frames):
    bad = _with_header(rollout_frames, lambda h: h["responses"][0].update(finish_reason="eos"))
    with pytest.raises(ProtocolError, match="finish_reason 'eos' is not one of"):
        decode(bad)


# ---------------------------------------------------------------- weight chunks
def _chunks(version, seed=0, chunk_bytes=256):
    g = torch.Generator().manual_seed(seed)
    state = {f"layer{i}.weight": torch.randn(8, 8, generator=g) for i in range(4)}
    return list(WeightSender(chunk_bytes, checksum_algo="crc32").publish(version, lambda: state.items()))


def test_weight_chunk_with_bad_checksum():
    msgs = _chunks(1)
    blob = bytearray(msgs[0].blob)
    blob[-1] ^= 0xFF
    bad = WeightUpdate(**{**msgs[0].__dict__, "blob": blob})
    recv = WeightReceiver()
    with pytest.raises(ProtocolError, match="crc32 checksum mismatch"):
        recv.feed(decode(_frames(bad)))
    assert recv.missing_chunks() == list(range(len(msgs)))  # nothing of the bad chunk was kept


def test_weight_chunk_of_older_version_interleaved():
    old, new = _chunks(1), _chunks(2, seed=1)
    recv = WeightReceiver()
    assert recv.feed(old[0]) is None
    assert recv.feed(new[0]) is None  # a newer version starts: the old one is abandoned
    with pytest.raises(ProtocolError, match="interleaved with newer version 2"):
        recv.feed(old[1])
    out = None
    for m in new[1:]:
        out = recv.feed(m)
    assert out is not None and out.version == 2 and recv.abandoned == 1


def test_weight_chunk_with_valid_checksum_but_bad_blob():
    from minirl_async.proto.stblob import checksum

    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "
    msg = WeightUpdate(version=1, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    with pytest.raises(ProtocolError, match="safetensors header is not valid JSON"):
        WeightReceiver().feed(decode(_frames(msg)))


def test_deeply_nested_safetensors_header():
    import struct

    from minirl_async.proto.stblob import checksum

    raw = b"[" * 100_000 + b"]" * 100_000
    blob = struct.pack("<Q", len(raw)) + raw
    msg = WeightUpdate(version=1, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        WeightReceiver().feed(msg)
