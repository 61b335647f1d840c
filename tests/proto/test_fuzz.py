"""Property-based fuzzing of the decoder: random frames, byte-level and structure-level mutations of valid
messages, and mutated safetensors blobs. Only ProtocolError may come out; whatever decodes re-encodes."""

from __future__ import annotations

import msgpack
import numpy as np
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from minirl_async.proto.codec import decode, encode
from minirl_async.proto.messages import MESSAGE_TYPES, PROTO_VERSION, ProtocolError
from minirl_async.proto.stblob import read_blob, write_blob

FUZZ = settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# Array dimensions: zeros mixed with huge values (an empty array whose other dimensions overflow numpy's or
# torch's index arithmetic passes a byte-size check), around the 2**31 / 2**63 / 2**64 boundaries.
dims = st.sampled_from([0, 0, 1, 2, 2**31 - 1, 2**31, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1)
shapes = st.lists(dims, max_size=10)

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text(max_size=8) | st.binary(max_size=8)
    | shapes,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)


def _check(frames):
    try:
        msg = decode(frames, max_bytes=1 << 20)
    except ProtocolError:
        return
    encode(msg)  # anything accepted must be a valid message


def _bytes_frames(msg):
    return [bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in encode(msg)]


@FUZZ
@given(st.lists(st.binary(max_size=300), min_size=0, max_size=6))
def test_random_frames(frames):
    _check(frames)


@FUZZ
@given(data=st.data())
def test_byte_mutations_of_valid_messages(messages, data):
    frames = _bytes_frames(data.draw(st.sampled_from(messages)))
    i = data.draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    for _ in range(data.draw(st.integers(1, 4))):
        op = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        pos = data.draw(st.integers(0, max(len(f) - 1, 0)))
        if op == "flip" and f:
            f[pos] ^= data.draw(st.integers(1, 255))
        elif op == "cut":
            del f[pos:pos + data.draw(st.integers(1, 16))]
        else:
            f[pos:pos] = data.draw(st.binary(min_size=1, max_size=8))
    frames[i] = bytes(f)
    if data.draw(st.booleans()):  # also drop, duplicate or swap frames
        j = data.draw(st.integers(0, len(frames) - 1))
        op = data.draw(st.sampled_from(["drop", "dup", "swap"]))
        if op == "drop":
            frames.pop(j)
        elif op == "dup":
            frames.insert(j, frames[j])
        else:
            frames[0], frames[j] = frames[j], frames[0]
    _check(frames)


def _paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


@FUZZ
@given(data=st.data())
def test_structural_mutations_of_valid_headers(messages, data):
    frames = _bytes_frames(data.draw(st.sampled_from(messages)))
    header = msgpack.unpackb(frames[0], raw=False)
    paths = [p for p in _paths(header) if p]
    for _ in range(data.draw(st.integers(1, 3))):
        path = data.draw(st.sampled_from(paths))
        parent = header
        try:
            for k in path[:-1]:
                parent = parent[k]
            if data.draw(st.booleans()) and isinstance(parent, dict):
                parent.pop(path[-1], None)
            else:
                parent[path[-1]] = data.draw(json_like)
        except (KeyError, IndexError, TypeError):
            continue
    _check([msgpack.packb(header, use_bin_type=True), *frames[1:]])


def _descriptors(obj):
    if isinstance(obj, dict):
        if "shape" in obj and "frame" in obj:
            yield obj
        for v in obj.values():
            yield from _descriptors(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _descriptors(v)


@FUZZ
@given(data=st.data())
def test_descriptor_shapes_with_zero_and_huge_dims(messages, data):
    """Shapes of the right rank (or any) with a zero and huge dimensions, over an empty or unchanged frame."""
    frames = _bytes_frames(data.draw(st.sampled_from([m for m in messages if len(encode(m)) > 1])))
    header = msgpack.unpackb(frames[0], raw=False)
    desc = data.draw(st.sampled_from(list(_descriptors(header))))
    rank = len(desc["shape"])
    shape = data.draw(st.lists(dims, min_size=rank, max_size=rank) | shapes)
    if shape and data.draw(st.booleans()):
        shape[data.draw(st.integers(0, len(shape) - 1))] = 0
    desc["shape"] = shape
    if data.draw(st.sampled_from(["int32", "uint8", "float32", "keep"])) != "keep" and desc["dtype"] != "uint8":
        desc["dtype"] = data.draw(st.sampled_from(["int32", "uint8", "float32", "int16", "float64"]))
    if 0 in shape or data.draw(st.booleans()):
        frames[desc["frame"]] = b""
    _check([msgpack.packb(header, use_bin_type=True), *frames[1:]])


@FUZZ
@given(type_name=st.sampled_from(sorted(MESSAGE_TYPES)), fields=st.dictionaries(st.text(max_size=12), json_like, max_size=8))
def test_random_headers_of_known_types(type_name, fields):
    _check([msgpack.packb({"proto": PROTO_VERSION, "type": type_name, **fields}, use_bin_type=True)])


_BLOB = bytes(write_blob([("a", torch.arange(6, dtype=torch.float32).reshape(2, 3)),
                          ("b", torch.ones(5, dtype=torch.bfloat16))]))


def _read_or_refuse(blob: bytes | bytearray) -> None:
    """read_blob either refuses with ProtocolError or returns tensors that lie inside the blob and can be read."""
    try:
        tensors, _ = read_blob(memoryview(blob))
    except ProtocolError:
        return
    for t in tensors.values():
        assert t.numel() * t.element_size() <= len(blob)
        np.asarray(t.float().sum())  # readable without faults


@settings(max_examples=500, deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(_BLOB) - 1), st.integers(0, 255)), min_size=1, max_size=6),
       st.integers(1, len(_BLOB)))
def test_mutated_safetensors_blobs(flips, length):
    blob = bytearray(_BLOB[:length])
    for pos, val in flips:
        if pos < len(blob):
            blob[pos] = val
    _read_or_refuse(blob)


@settings(max_examples=500, deadline=None)
@given(entries=st.lists(st.tuples(st.sampled_from(["F32", "BF16", "U8", "F8_E4M3", "I64"]), shapes,
                                  st.booleans()), min_size=1, max_size=3))
def test_safetensors_headers_with_zero_and_huge_dims(entries):
    import json
    import struct

    from minirl_async.proto.stblob import ST_DTYPES

    header, pos = {}, 0
    for i, (dtype, shape, honest) in enumerate(entries):
        n = 1
        for d in shape:
            n *= d
        n = n * ST_DTYPES[dtype].itemsize if honest and n * ST_DTYPES[dtype].itemsize < 4096 else 0
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw)) + raw + bytes(pos)
    _read_or_refuse(blob)


@settings(max_examples=300, deadline=None)
@given(splits=st.dictionaries(st.sampled_from(["w[0:2]", "w[2:4]", "v", "x[0:1]"]),
                              st.lists(st.integers(-2, 6) | st.sampled_from(["w", "v", "x"]), max_size=5), max_size=3),
       raw=st.booleans(), text=st.text(max_size=20))
def test_weight_chunks_with_random_split_metadata(splits, raw, text):
    import json

    from minirl_async.proto.messages import WeightUpdate
    from minirl_async.proto.stblob import checksum
    from minirl_async.proto.weights import SPLIT_KEY, WeightReceiver, chunk_metadata

    blob = write_blob([("w[0:2]", torch.ones(2, 3)), ("w[2:4]", torch.zeros(2, 3)), ("v", torch.ones(1))],
                      {**chunk_metadata(1, 9, 0, 1, 2, 0), SPLIT_KEY: text if raw else json.dumps(splits)})
    msg = WeightUpdate(version=1, publish_id=9, chunk_index=0, num_chunks=1, num_tensors=2, blob=blob,
                       checksum=checksum(blob, "crc32"), checksum_algo="crc32")
    try:
        out = WeightReceiver().feed(msg)
    except ProtocolError:
        return
    assert out is not None and set(out.tensors) <= {"w", "v", "w[0:2]", "w[2:4]"}
