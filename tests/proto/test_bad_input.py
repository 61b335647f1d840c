"""Every kind of bad input of issue #4 is its own test: decode raises ProtocolError with a clear message."""

from __future__ import annotations

import os

import msgpack
import numpy as np
import pytest
import torch
from minirl_async.proto import stblob
from minirl_async.proto.codec import (
    MAX_ERROR_CHARS,
    MAX_FRAMES,
    MAX_HEADER_BYTES,
    MAX_HEADER_ITEMS,
    decode,
    encode,
)
from minirl_async.proto.messages import PROTO_VERSION, ProtocolError, WeightUpdate
from minirl_async.proto.stblob import checksum, read_blob
from minirl_async.proto.weights import WeightReceiver, WeightSender, chunk_metadata


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


def test_errors_about_many_frames_or_fields_stay_short(rollout_frames):
    n = len(rollout_frames)
    with pytest.raises(ProtocolError, match=rf"frames \[{n}, {n + 1}, .*, \.\.\.\] \(50000 in all\) are not referenced") as e:
        decode([*rollout_frames, *[b""] * 50_000])
    assert len(str(e.value)) <= MAX_ERROR_CHARS
    with pytest.raises(ProtocolError, match=r"unexpected field\(s\) \['k0', .*\(20000 in all\)") as e:
        decode(_with_header(rollout_frames, lambda h: h.update({f"k{i}": "v" * 100 for i in range(20_000)})))
    assert len(str(e.value)) <= MAX_ERROR_CHARS


def test_too_many_frames_are_refused_on_both_ends():
    with pytest.raises(ProtocolError, match=f"message of {MAX_FRAMES + 1} frames exceeds the limit of {MAX_FRAMES}"):
        decode([b"\x80"] * (MAX_FRAMES + 1))
    msg = WeightUpdate(version=1, publish_id=1, chunk_index=0, num_chunks=1, num_tensors=1, blob=[b"x"] * MAX_FRAMES,
                       checksum=1, checksum_algo="crc32")
    with pytest.raises(ProtocolError, match=f"{MAX_FRAMES + 1} frames exceed the limit of {MAX_FRAMES}"):
        encode(msg)


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


# Shapes whose element count is 0 (so an empty frame passes the byte-size check) but whose other dimensions
# overflow what numpy / torch can index: numpy raised ValueError, torch TypeError, past the ProtocolError net.
HUGE_EMPTY_SHAPES = [[0, 2**63, 4], [0, 2**64 - 1, 1], [0, 2**31, 2], [0, 2**31 - 1, 2**31 - 1],
                     [2**31 - 1, 0, 2**31 - 1]]


@pytest.mark.parametrize("shape", HUGE_EMPTY_SHAPES)
def test_zero_dim_with_huge_dims_in_a_descriptor(rollout_frames, shape):
    header = msgpack.unpackb(rollout_frames[0], raw=False)
    desc = header["responses"][0]["routes"]  # a 3-D field: rank and dtype pass, only the shape is bad
    desc["shape"], desc["dtype"] = shape, "int32"
    frames = [msgpack.packb(header, use_bin_type=True), *rollout_frames[1:]]
    frames[desc["frame"]] = b""
    with pytest.raises(ProtocolError, match=r"responses\.0\.routes: (every dimension|shape .* too large)"):
        decode(frames)


def test_descriptor_rank_and_dims_are_bounded(rollout_frames):
    def edit(h):
        h["responses"][0]["routes"]["shape"] = [0] * 9
    with pytest.raises(ProtocolError, match="9 dimensions, at most 8"):
        decode(_with_header(rollout_frames, edit))
    big = WeightUpdate(version=0, publish_id=0, chunk_index=0, num_chunks=1, num_tensors=1, blob=b"",
                       checksum=0, checksum_algo="crc32")
    frames = _with_header(_frames(big), lambda h: h["blob"][0].update(shape=[2**31]))
    with pytest.raises(ProtocolError, match=r"blob\.0: every dimension must be in \[0, 2\*\*31\)"):
        decode(frames)


def _st_blob(entries: dict, data: bytes = b"") -> bytes:
    import json
    import struct

    raw = json.dumps(entries).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize("shape", HUGE_EMPTY_SHAPES)
def test_zero_dim_with_huge_dims_in_a_safetensors_blob(shape):
    blob = _st_blob({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    with pytest.raises(ProtocolError, match="tensor 'w': (every dimension|shape .* too large)"):
        read_blob(blob)
    # and through the receiver, with a valid checksum and header metadata: dropped, nothing kept
    meta = chunk_metadata(1, 7, 0, 1, 1, 0)
    blob = _st_blob({"__metadata__": meta, "w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 0]}})
    recv = WeightReceiver()
    with pytest.raises(ProtocolError, match="tensor 'w'"):
        recv.feed(WeightUpdate(version=1, publish_id=7, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                               checksum=checksum(blob, "crc32"), checksum_algo="crc32"))
    assert recv.pending_version is None


def test_safetensors_rank_is_bounded():
    with pytest.raises(ProtocolError, match="9 dimensions, at most 8"):
        read_blob(_st_blob({"w": {"dtype": "F32", "shape": [1] * 9, "data_offsets": [0, 4]}}, b"\0" * 4))


def test_oversized_header_is_refused_before_unpacking():
    reason = "x" * MAX_HEADER_BYTES  # one string: cheap to unpack, but over the header limit all the same
    header = msgpack.packb({"proto": PROTO_VERSION, "type": "Shutdown", "sender": "a", "reason": reason})
    with pytest.raises(ProtocolError, match=f"header \\(frame 0\\) of {len(header)} bytes exceeds the limit of "
                                            f"{MAX_HEADER_BYTES} bytes"):
        decode([header], max_bytes=1 << 30)
    from minirl_async.proto.messages import Shutdown

    with pytest.raises(ProtocolError, match="header .* exceeds the limit"):  # the sender is told, too
        encode(Shutdown(sender="a", reason=reason))


def test_header_of_many_small_items_is_refused_with_bounded_memory():
    import tracemalloc

    # ~15 MiB of empty maps: unpacked unchecked, this grew the receiver by ~1.1 GB
    rows = (MAX_HEADER_BYTES - 4096) // 1003
    header = msgpack.packb({"proto": PROTO_VERSION, "type": "Shutdown", "sender": "a",
                            "reason": [[{}] * 1000] * rows})
    assert len(header) <= MAX_HEADER_BYTES
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=f"holds more than {MAX_HEADER_ITEMS} msgpack items"):
            decode([header])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 << 20, f"decoding a refused header peaked at {peak >> 20} MiB"


def test_header_item_limit_applies_to_valid_looking_messages_and_to_encode():
    from minirl_async.proto.messages import PromptGroup, WorkGrant

    grant = WorkGrant(groups=[PromptGroup(group_id="g", attempt=0, prompt_ids=[1], group_size=1,
                                          meta={"answer": "1", "steps": [0] * MAX_HEADER_ITEMS})])
    with pytest.raises(ProtocolError, match="more than .* msgpack items"):
        encode(grant)
    header = msgpack.packb({"proto": PROTO_VERSION, "type": "WorkGrant", "backoff_s": 0.0,
                            "groups": [{"group_id": "g", "attempt": 0, "group_size": 1,
                                        "meta": {"steps": [[]] * (MAX_HEADER_ITEMS // 2)},
                                        "prompt_ids": {"name": "groups.0.prompt_ids", "dtype": "int32",
                                                       "shape": [1], "frame": 1}}]})
    with pytest.raises(ProtocolError, match="more than .* msgpack items"):
        decode([header, np.ones(1, np.int32).tobytes()])


def test_realistic_headers_are_far_below_the_limits(rollout_factory):
    """The largest headers the services send (module docstring of codec.py) keep a wide margin."""
    from minirl_async.proto.messages import PromptGroup, ScoredGroup, WorkGrant

    def items(o):
        if isinstance(o, dict):
            return 1 + len(o) + sum(items(v) for v in o.values())
        if isinstance(o, list):
            return 1 + len(o) + sum(items(v) for v in o)
        return 0

    g = rollout_factory(np.random.default_rng(3), G=1024, P=200, L=48, K=8)
    scored = ScoredGroup.from_rollout(g, np.zeros(1024, np.float32), {"grader": "exact"}, ["timeout"] * 8)
    grant = WorkGrant(groups=[PromptGroup(group_id=f"group-{i:08d}", attempt=3, prompt_ids=np.arange(300),
                                          meta={"answer": "x" * 50, "task": "code",
                                                "tests": [{"input": "1 2", "output": "3"}] * 20},
                                          group_size=16) for i in range(512)])
    for msg in (scored, grant):
        frames = encode(msg)
        assert len(frames[0]) < MAX_HEADER_BYTES // 32
        assert items(msgpack.unpackb(frames[0], raw=False)) < MAX_HEADER_ITEMS // 16
        decode(frames)


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
    blob = bytearray(b"".join(msgs[0].blob))
    blob[-1] ^= 0xFF
    bad = WeightUpdate(**{**msgs[0].__dict__, "blob": blob})
    recv = WeightReceiver()
    with pytest.raises(ProtocolError, match="crc32 checksum mismatch"):
        recv.feed(decode(_frames(bad)))
    # nothing of the bad chunk was kept: it did not even become the version being assembled
    assert recv.pending_version is None and recv.missing_chunks() == [] and recv.abandoned == 0
    # a bad chunk in the middle of an assembly leaves it as it was
    assert recv.feed(msgs[0]) is None
    with pytest.raises(ProtocolError, match="checksum mismatch"):
        recv.feed(decode(_frames(WeightUpdate(**{**msgs[1].__dict__, "blob": blob}))))
    assert recv.missing_chunks() == list(range(1, len(msgs)))
    out = None
    for m in msgs[1:]:
        out = recv.feed(m)
    assert out is not None and out.version == 1


def _huge_version(msg, corrupt_blob):
    """`msg` with version 10**9 in its header (the header is not covered by the checksum)."""
    frames = _frames(msg)
    if corrupt_blob:
        i = msgpack.unpackb(frames[0], raw=False)["blob"][0]["frame"]
        blob = bytearray(frames[i])
        blob[len(blob) // 2] ^= 0x10
        frames[i] = bytes(blob)
    return decode(_with_header(frames, lambda h: h.update(version=10**9)))


@pytest.mark.parametrize("corrupt_blob", [True, False], ids=["blob-corrupted-too", "header-only"])
def test_corrupted_chunk_claiming_a_huge_version_changes_nothing(corrupt_blob):
    v1, v2 = _chunks(1), _chunks(2, seed=1)
    recv = WeightReceiver()
    with pytest.raises(ProtocolError, match="checksum mismatch" if corrupt_blob else "header disagrees"):
        recv.feed(_huge_version(v1[2], corrupt_blob))  # before any assembly
    assert recv.pending_version is None
    assert recv.feed(v1[0]) is None
    with pytest.raises(ProtocolError, match="checksum mismatch" if corrupt_blob else "header disagrees"):
        recv.feed(_huge_version(v2[0], corrupt_blob))  # in the middle of one
    assert recv.pending_version == 1 and recv.missing_chunks() == list(range(1, len(v1))) and recv.abandoned == 0
    outs = [recv.feed(m) for m in v1[1:]] + [recv.feed(m) for m in v2]
    assert [o.version for o in outs if o is not None] == [1, 2] and recv.abandoned == 0


def test_weight_chunk_header_must_match_its_blob_metadata():
    msgs = _chunks(1)
    recv = WeightReceiver()
    for edit in (lambda h: h.update(chunk_index=1), lambda h: h.update(publish_id=h["publish_id"] ^ 1),
                 lambda h: h.update(num_tensors=9), lambda h: h.update(num_chunks=9)):
        with pytest.raises(ProtocolError, match="header disagrees with the checksummed blob metadata"):
            recv.feed(decode(_with_header(_frames(msgs[0]), edit)))
    assert recv.pending_version is None


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
    blob = b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "
    msg = WeightUpdate(version=1, publish_id=1, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    with pytest.raises(ProtocolError, match="safetensors header is not valid JSON"):
        WeightReceiver().feed(decode(_frames(msg)))


def test_deeply_nested_safetensors_header():
    import struct

    raw = b"[" * 100_000 + b"]" * 100_000
    blob = struct.pack("<Q", len(raw)) + raw
    msg = WeightUpdate(version=1, publish_id=1, chunk_index=0, num_chunks=1, num_tensors=1, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    with pytest.raises(ProtocolError, match="not valid JSON"):
        WeightReceiver().feed(msg)


@pytest.mark.parametrize("body, match", [
    (b'{"x":[' + b"[]," * ((stblob.MAX_HEADER_BYTES - 16) // 3) + b"[]]}", "more than 131072 JSON items"),
    (b'{"x":"' + b"a" * stblob.MAX_HEADER_BYTES + b'"}', "header of 8388616 bytes exceeds the limit of 8388608"),
])
def test_safetensors_header_is_bounded_before_parsing(body, match):
    import struct
    import tracemalloc

    # a 60 MiB header of `[]` items grew the receiver by 1.5 GB; now refused before json.loads
    body += b" " * (-len(body) % 8)
    blob = struct.pack("<Q", len(body)) + body
    tracemalloc.start()
    try:
        with pytest.raises(ProtocolError, match=match):
            read_blob(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2 * len(body) + (1 << 20), f"refusing the header peaked at {peak >> 20} MiB"


def test_writers_refuse_headers_the_reader_would_refuse():
    with pytest.raises(ValueError, match="over MAX_HEADER_BYTES"):
        stblob.write_blob([("n" * stblob.MAX_HEADER_BYTES, torch.zeros(1))])
    with pytest.raises(ValueError, match="MAX_HEADER_ITEMS"):
        stblob.write_blob([("w", torch.zeros(1))], metadata={"m": "," * stblob.MAX_HEADER_ITEMS})
