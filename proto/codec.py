"""Codec: message <-> ZeroMQ multipart frames, zero-copy for arrays, strict on decode. No pickle.

Frame 0 is a msgpack map `{"proto": PROTO_VERSION, "type": "<Type>", <field>: <value>, ...}`. Every array
(and each segment of a WeightUpdate's blob) travels in its own frame; in the header its field holds the descriptor
`{"name": <path>, "dtype": <str>, "shape": [..], "frame": <int>}`. Nested messages (a WorkGrant's groups,
a RolloutGroup's responses) are msgpack maps without "proto"/"type"; array paths name them, e.g.
`responses.3.logprobs`.

`encode` returns the arrays themselves as frames (send them with `copy=False`: zmq keeps a reference, no
copy). `decode` takes what `recv_multipart(copy=False)` returns (zmq.Frame) or any bytes-like objects and
builds arrays with `numpy.frombuffer` over the frame buffers, so decoded arrays share the frames' memory.

Decoding is strict: everything but a well-formed message of this protocol version raises ProtocolError
naming what is wrong: not msgpack, header not a map, wrong proto, unknown type, missing or extra field,
wrong field type, dtype off the whitelist, a shape that is not a wire shape (`messages.check_shape`: at
most 8 dimensions, each below 2**31), shape/frame-length mismatch, unreferenced or reused frame,
non-finite values where finite is required, total size over `max_bytes`, more than `MAX_FRAMES` frames,
a header over its own limits (below), or a broken message invariant. Nothing else escapes `decode`. Error
messages stay short (`short`, at most `MAX_ERROR_CHARS`): lists of frames or fields are abbreviated.

Header limits. Arrays travel as frames, so a header holds only scalars, ids, descriptors and task
metadata; the largest realistic ones are ~300 KB and ~50k items (a WorkGrant of 512 groups whose meta
carries 20 test cases each; a ScoredGroup of G=1024 responses with routes). Unpacking msgpack is what
costs memory: a one-byte empty map becomes a ~64-byte Python dict, so an unchecked 20 MB header of empty
maps grew a receiver by 1.4 GB. Frame 0 is therefore refused before unpacking when it is over
`MAX_HEADER_BYTES` (16 MiB), and while unpacking when it holds more than `MAX_HEADER_ITEMS` (2**20) items
(containers plus their elements; each map or array is counted as it completes, and none may be longer
than that either). Measured on this machine, the worst headers tried (15 MiB of empty maps, of 2-byte
strings, of maps of them) now cost at most ~75 MB before they are refused, where 16 MiB of empty maps
unpacked unchecked cost 1.1 GB. Task metadata (`meta`) counts against these limits: reference a large
test suite by name instead of inlining it. `encode` enforces the same limits, so the sender learns of an
oversized header instead of its peer dropping it (and the learner re-issuing it) forever.

    frames = encode(msg); sock.send_multipart(frames, copy=False)
    msg = decode(sock.recv_multipart(copy=False), max_bytes=cfg.network.max_msg_bytes)
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import typing
from collections.abc import Sequence
from functools import cache
from typing import Any

import msgpack
import numpy as np
from minirl_async.proto.messages import (
    MESSAGE_TYPES,
    PROTO_VERSION,
    Buffer,
    Message,
    ProtocolError,
    Segments,
    _Message,
    check_shape,
)

DTYPE_WHITELIST = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"}
)
"""Array dtypes allowed on the wire (each field narrows this further)."""

DEFAULT_MAX_BYTES = 1 << 30
MAX_HEADER_BYTES = 16 << 20
"""Largest frame 0 (msgpack header) accepted, whatever `max_bytes` allows (see the module docstring)."""
MAX_HEADER_ITEMS = 1 << 20
"""Most msgpack items in one header: maps and arrays plus their entries and elements."""
MAX_FRAMES = 1 << 16
"""Most frames in one message, header included: ~16x the largest real one (a ScoredGroup of G=1024
responses with routes has ~4k). Receivers (`sockets.recv_bounded`) stop keeping frames past it: each frame
costs ~700 bytes of Python objects however small it is (2M empty frames took 1.5 GB)."""
MAX_ERROR_CHARS = 500
"""Longest ProtocolError message this module (and the receive loop) produces or logs."""
_DESC_KEYS = frozenset({"name", "dtype", "shape", "frame"})
_MAX_JSON_DEPTH = 32


# ---------------------------------------------------------------- schema (from the dataclass annotations)
@cache
def _schema(cls: type) -> tuple[tuple[str, str, Any], ...]:
    """(field name, kind, detail) per field; kinds: str int float bool json fdict slist tensor blob segments list."""
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, str, Any]] = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        if f.metadata.get("tensor"):
            out.append((f.name, "tensor", f.metadata))
        elif hint == Buffer:
            out.append((f.name, "blob", None))
        elif hint == Segments:
            out.append((f.name, "segments", None))
        elif hint in (str, int, float, bool):
            out.append((f.name, hint.__name__, None))
        elif hint == dict[str, Any]:
            out.append((f.name, "json", None))
        elif hint == dict[str, float]:
            out.append((f.name, "fdict", None))
        elif hint == list[str]:
            out.append((f.name, "slist", str))
        elif hint == list[int]:
            out.append((f.name, "slist", int))
        elif typing.get_origin(hint) is list and issubclass(typing.get_args(hint)[0], _Message):
            out.append((f.name, "list", typing.get_args(hint)[0]))
        else:  # pragma: no cover - a message definition error, caught by the round-trip tests
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported wire type {hint}")
    return tuple(out)


def short(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """`text` cut to `limit` characters (a peer must not be able to make log lines of megabytes)."""
    return text if len(text) <= limit else f"{text[:limit - 30]}... ({len(text)} characters)"


def _listing(items: Any, n: int = 8) -> str:
    """The `n` smallest of `items` (each cut to 50 characters) and how many there are in all."""
    first = heapq.nsmallest(n, items, key=lambda x: (type(x).__name__, x))
    text = ", ".join(f"{x!r:.50}" for x in first)
    return f"[{text}]" if len(items) <= n else f"[{text}, ...] ({len(items)} in all)"


# ---------------------------------------------------------------- encode
def encode(msg: Message) -> list[Any]:
    """Frames of `msg` (validated first): [header bytes, array or blob, ...]. Send with copy=False."""
    if not isinstance(msg, _Message) or msg.TYPE not in MESSAGE_TYPES:
        raise TypeError(f"not a wire message: {type(msg).__name__}")
    msg.validate()
    frames: list[Any] = [b""]
    header: dict[str, Any] = {"proto": PROTO_VERSION, "type": msg.TYPE}
    header.update(_encode_fields(msg, frames, ""))
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"{msg.TYPE}: {len(frames)} frames exceed the limit of {MAX_FRAMES} (MAX_FRAMES)")
    raw = msgpack.packb(header, use_bin_type=True)
    if len(raw) > MAX_HEADER_ITEMS:  # a header of fewer bytes cannot hold more items: check only big ones
        _unpack_header(raw)
    frames[0] = raw
    return frames


def _encode_fields(obj: Any, frames: list[Any], prefix: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind, _ in _schema(type(obj)):  # type: ignore[arg-type]
        value = getattr(obj, name)
        path = prefix + name
        if kind == "tensor":
            if value is None:
                out[name] = None
                continue
            a = np.ascontiguousarray(value)
            if not a.dtype.isnative:
                a = a.astype(a.dtype.newbyteorder("="))
            shape = check_shape(list(a.shape), a.dtype.itemsize, path)
            out[name] = {"name": path, "dtype": a.dtype.name, "shape": shape, "frame": len(frames)}
            frames.append(a)
        elif kind == "blob":
            mv = memoryview(value).cast("B")
            shape = check_shape([mv.nbytes], 1, path)
            out[name] = {"name": path, "dtype": "uint8", "shape": shape, "frame": len(frames)}
            frames.append(value)
        elif kind == "segments":
            out[name] = []
            for i, seg in enumerate(value):
                mv = memoryview(seg).cast("B")
                shape = check_shape([mv.nbytes], 1, f"{path}.{i}")
                out[name].append({"name": f"{path}.{i}", "dtype": "uint8", "shape": shape, "frame": len(frames)})
                frames.append(seg)
        elif kind == "list":
            out[name] = [_encode_fields(item, frames, f"{path}.{i}.") for i, item in enumerate(value)]
        elif kind == "float":
            out[name] = float(value)
        else:
            out[name] = value
    return out


# ---------------------------------------------------------------- decode
def _as_bytes_view(frame: Any) -> memoryview:
    buf = getattr(frame, "buffer", frame)  # zmq.Frame -> its memoryview; bytes-likes as they are
    try:
        mv = memoryview(buf)
    except TypeError:
        raise ProtocolError(f"frame of type {type(frame).__name__} is not bytes-like") from None
    if mv.format != "B" or mv.ndim != 1:
        try:
            mv = mv.cast("B") if mv.ndim else mv.cast("B", (mv.nbytes,))
        except TypeError:
            raise ProtocolError("frame is not a contiguous buffer") from None
    return mv


def _no_ext(code: int, data: bytes) -> Any:
    raise ProtocolError(f"msgpack extension type {code} is not allowed")


def _unpack_header(buf: Buffer) -> Any:
    """Frame 0 unpacked within MAX_HEADER_BYTES and MAX_HEADER_ITEMS, or ProtocolError."""
    nbytes = memoryview(buf).nbytes
    if nbytes > MAX_HEADER_BYTES:
        raise ProtocolError(f"header (frame 0) of {nbytes} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    budget = MAX_HEADER_ITEMS

    def count(container: Any) -> Any:  # called as each map / array completes (object_hook, list_hook)
        nonlocal budget
        budget -= 1 + len(container)
        if budget < 0:
            raise ProtocolError(f"header (frame 0) holds more than {MAX_HEADER_ITEMS} msgpack items")
        return container

    try:
        return msgpack.unpackb(buf, raw=False, strict_map_key=True, ext_hook=_no_ext, timestamp=0,
                               object_hook=count, list_hook=count, max_str_len=MAX_HEADER_BYTES,
                               max_bin_len=MAX_HEADER_BYTES, max_ext_len=MAX_HEADER_BYTES,
                               max_array_len=MAX_HEADER_ITEMS, max_map_len=MAX_HEADER_ITEMS)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ExtraData, FormatError, StackError, ValueError...)
        raise ProtocolError(short(f"frame 0 is not a valid msgpack header: {type(e).__name__}: {e}")) from None


def decode(frames: Sequence[Any], *, max_bytes: int = DEFAULT_MAX_BYTES) -> Message:
    """Parse frames into a validated message, or raise ProtocolError saying what is wrong."""
    if not isinstance(frames, Sequence):
        raise ProtocolError(f"expected a list of frames, got {type(frames).__name__}")
    if len(frames) == 0:
        raise ProtocolError("empty multipart message")
    if len(frames) > MAX_FRAMES:
        raise ProtocolError(f"message of {len(frames)} frames exceeds the limit of {MAX_FRAMES} frames")
    bufs = [_as_bytes_view(f) for f in frames]
    total = sum(b.nbytes for b in bufs)
    if total > max_bytes:
        raise ProtocolError(f"message of {total} bytes exceeds the limit of {max_bytes} bytes (max_msg_bytes)")
    header = _unpack_header(bufs[0])
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a msgpack map, got {type(header).__name__}")
    proto = header.get("proto")
    if type(proto) is not int:
        raise ProtocolError(f"header has no integer 'proto' field (got {proto!r:.50})")
    if proto != PROTO_VERSION:
        raise ProtocolError(f"protocol version mismatch: peer speaks proto {proto}, this side speaks {PROTO_VERSION}")
    type_name = header.get("type")
    cls = MESSAGE_TYPES.get(type_name) if isinstance(type_name, str) else None
    if cls is None:
        raise ProtocolError(f"unknown message type {type_name!r:.80}; known: {sorted(MESSAGE_TYPES)}")
    fields = {k: v for k, v in header.items() if k not in ("proto", "type")}
    used: set[int] = set()
    msg = _decode_obj(cls, fields, bufs, used, "")
    unused = set(range(1, len(bufs))) - used
    if unused:
        raise ProtocolError(f"{type_name}: frames {_listing(unused)} are not referenced by the header")
    try:
        msg.validate()
    except ProtocolError as e:
        raise ProtocolError(short(f"{type_name}: {e}")) from None
    return msg  # type: ignore[return-value]


def _decode_obj(cls: type, fields: Any, bufs: list[memoryview], used: set[int], prefix: str) -> Any:
    where = f"{cls.__name__}{' at ' + prefix.rstrip('.') if prefix else ''}"
    if not isinstance(fields, dict):
        raise ProtocolError(f"{where}: expected a map, got {type(fields).__name__}")
    schema = _schema(cls)
    expected = {name for name, _, _ in schema}
    missing, extra = expected - fields.keys(), fields.keys() - expected
    if missing:
        raise ProtocolError(f"{where}: missing field(s) {sorted(missing)}")
    if extra:
        raise ProtocolError(f"{where}: unexpected field(s) {_listing(extra)}")
    kwargs: dict[str, Any] = {}
    for name, kind, detail in schema:
        v, path = fields[name], prefix + name
        if kind == "tensor":
            kwargs[name] = _decode_tensor(v, path, detail, bufs, used)
        elif kind == "blob":
            kwargs[name] = _decode_blob(v, path, bufs, used)
        elif kind == "segments":
            if not isinstance(v, list) or not v:
                raise ProtocolError(f"{where}: field {name!r} must be a non-empty list of segment descriptors")
            kwargs[name] = [_decode_blob(d, f"{path}.{i}", bufs, used) for i, d in enumerate(v)]
        elif kind == "list":
            if not isinstance(v, list):
                raise ProtocolError(f"{where}: field {name!r} must be a list, got {type(v).__name__}")
            kwargs[name] = [_decode_obj(detail, item, bufs, used, f"{path}.{i}.") for i, item in enumerate(v)]
        else:
            kwargs[name] = _decode_scalar(v, kind, detail, f"{where}: field {name!r}")
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(short(f"{where}: {e}")) from None


def _decode_scalar(v: Any, kind: str, detail: Any, what: str) -> Any:
    if kind == "str" and type(v) is str:
        return v
    if kind == "int" and type(v) is int:
        return v
    if kind == "bool" and type(v) is bool:
        return v
    if kind == "float" and type(v) in (int, float):
        return float(v)
    if kind == "json":
        _check_json(v, what, 0)
        if isinstance(v, dict):
            return v
    if kind == "fdict" and isinstance(v, dict):
        if all(type(k) is str and type(x) in (int, float) for k, x in v.items()):
            return {k: float(x) for k, x in v.items()}
        raise ProtocolError(f"{what} must map names to numbers")
    if kind == "slist" and isinstance(v, list):
        if all(type(x) is detail for x in v):
            return v
        raise ProtocolError(f"{what} must be a list of {detail.__name__}")
    expected = {"json": "a map", "fdict": "a map", "slist": "a list"}.get(kind, kind)
    raise ProtocolError(f"{what} must be {expected}, got {type(v).__name__}")


def _check_json(v: Any, what: str, depth: int) -> None:
    if depth > _MAX_JSON_DEPTH:
        raise ProtocolError(f"{what} is nested deeper than {_MAX_JSON_DEPTH}")
    if v is None or type(v) in (bool, int, str):
        return
    if type(v) is float:
        return
    if isinstance(v, list):
        for x in v:
            _check_json(x, what, depth + 1)
        return
    if isinstance(v, dict):
        for k, x in v.items():
            if type(k) is not str:
                raise ProtocolError(f"{what} has a non-string key {k!r:.50}")
            _check_json(x, what, depth + 1)
        return
    raise ProtocolError(f"{what} holds a {type(v).__name__}, not JSON-like data")


def _frame_of(desc: Any, path: str, bufs: list[memoryview], used: set[int]) -> tuple[str, list[int], memoryview]:
    if not isinstance(desc, dict) or set(desc) != _DESC_KEYS:
        raise ProtocolError(f"{path}: tensor descriptor must be a map with keys {sorted(_DESC_KEYS)}, got {desc!r:.200}")
    name, dtype, shape, frame = desc["name"], desc["dtype"], desc["shape"], desc["frame"]
    if name != path:
        raise ProtocolError(f"{path}: descriptor names {name!r:.100}")
    if not isinstance(dtype, str) or dtype not in DTYPE_WHITELIST:
        raise ProtocolError(f"{path}: dtype {dtype!r:.50} is not on the whitelist {sorted(DTYPE_WHITELIST)}")
    check_shape(shape, np.dtype(dtype).itemsize, path)
    if type(frame) is not int or not 1 <= frame < len(bufs):
        raise ProtocolError(f"{path}: frame index {frame!r:.50} is outside 1..{len(bufs) - 1}")
    if frame in used:
        raise ProtocolError(f"{path}: frame {frame} is referenced twice")
    used.add(frame)
    nbytes = math.prod(shape) * np.dtype(dtype).itemsize
    if bufs[frame].nbytes != nbytes:
        raise ProtocolError(
            f"{path}: shape {shape} of {dtype} needs {nbytes} bytes but frame {frame} has {bufs[frame].nbytes}"
        )
    return dtype, shape, bufs[frame]


def _decode_tensor(desc: Any, path: str, meta: Any, bufs: list[memoryview], used: set[int]) -> np.ndarray | None:
    if desc is None and meta["optional"]:
        return None
    dtype, shape, buf = _frame_of(desc, path, bufs, used)
    if dtype not in meta["dtypes"]:
        raise ProtocolError(f"{path}: dtype {dtype} not allowed here; expected one of {list(meta['dtypes'])}")
    if len(shape) != meta["ndim"]:
        raise ProtocolError(f"{path}: expected {meta['ndim']} dimensions, got shape {shape}")
    try:  # check_shape made this safe; a numpy error must still not escape as anything but ProtocolError
        a = np.frombuffer(buf, dtype=dtype).reshape(shape)
    except (ValueError, TypeError, OverflowError, MemoryError) as e:
        raise ProtocolError(f"{path}: cannot view frame as {dtype} {shape}: {str(e).splitlines()[0]:.200}") from None
    if meta["finite"] and not np.isfinite(a).all():
        raise ProtocolError(f"{path}: contains NaN or inf ({int((~np.isfinite(a)).sum())} values); must be finite")
    return a


def _decode_blob(desc: Any, path: str, bufs: list[memoryview], used: set[int]) -> memoryview:
    dtype, shape, buf = _frame_of(desc, path, bufs, used)
    if dtype != "uint8" or len(shape) != 1:
        raise ProtocolError(f"{path}: a blob is a 1-D uint8 frame, got {dtype} {shape}")
    return buf


def messages_equal(a: Any, b: Any) -> bool:
    """Deep equality of two messages: same type, equal scalars, arrays of equal dtype, shape and values."""
    if isinstance(a, bytes | bytearray | memoryview) and isinstance(b, bytes | bytearray | memoryview):
        return bytes(a) == bytes(b)
    if type(a) is not type(b):
        return False
    if isinstance(a, _Message):
        return all(messages_equal(getattr(a, f.name), getattr(b, f.name)) for f in dataclasses.fields(a))  # type: ignore[arg-type]
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and a.shape == b.shape and bool(np.array_equal(a, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(messages_equal(x, y) for x, y in zip(a, b))
    return bool(a == b)
