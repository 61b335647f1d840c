"""Safetensors blobs in memory (one weight chunk each) and their checksums, without extra copies.

The bytes are the standard safetensors format (8-byte little-endian header length, JSON header padded
with spaces to 8 bytes, then the tensors' bytes back to back, no holes), so `safetensors.torch.load(blob)`
reads what `write_blob` writes and `read_blob` reads what `safetensors.torch.save` writes; the tests check
both directions. Why not call the library for every chunk: measured on this machine (64 MiB of bf16),
`safetensors.torch.save` runs at ~1.1 GB/s (two copies: tensor -> bytes -> blob) where `write_blob` copies
each tensor once into a preallocated buffer (~memcpy speed), and `safetensors.torch.load` needs `bytes`
(a copy of the received frame) where `read_blob` returns tensors that view the frame's memory.

Segments (`write_segments`): a blob can also travel as several buffers whose concatenation is the file,
each large tensor its own segment viewing the tensor's memory, so the sender copies nothing of it; zmq sends
each segment as a frame (`copy=False`). The checksum is of the concatenation either way. Measured on this
machine (weightsync bench, 256 MiB bf16 over ipc): the copy removed was ~25 ms of the sender's ~85 ms of CPU.

Checksums: xxh3_64 (~18 GB/s on one core, needs the `xxhash` package) when importable, else zlib crc32
(~2.4 GB/s; blake2b measured ~1.1 GB/s). The chunk names its algorithm so both ends agree.

    blob = write_blob([("w", w_bf16)]); tensors, meta = read_blob(blob)
    segs = write_segments([("w", w_bf16)], borrow=lambda i: True); tensors, meta = read_blob(segs)
"""

from __future__ import annotations

import bisect
import json
import math
import struct
import sys
import warnings
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from minirl_async.proto.messages import ProtocolError, check_shape

try:  # optional fast hash; crc32 is the portable fallback
    import xxhash
except ImportError:  # pragma: no cover - depends on the environment
    xxhash = None  # type: ignore[assignment]

ST_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
    "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
    "F64": torch.float64, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
"""Safetensors dtype names accepted in weight chunks (a whitelist: anything else is a ProtocolError)."""
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}
MAX_CHUNK_TENSORS = 4096
"""Most tensors in one chunk (`WeightSender.plan` starts a new chunk past it): a real header entry is ~100-200
bytes of JSON and ~10 of the items counted below, so 4096 of them stay far below both header limits."""
MAX_HEADER_BYTES = 8 << 20
"""Largest safetensors JSON header accepted or written (4096 entries need ~1 MiB)."""
MAX_HEADER_ITEMS = 1 << 17
"""Most JSON items in a header, counted before parsing as its `[`, `{` and `,` bytes (an upper bound of the
containers and values Python creates, up to a factor ~3). Parsing costs memory per item, not per byte: a
60 MiB header of `[]` took 1.5 GB; within both limits the worst headers tried peaked at ~30 MB."""


def header_items(raw: bytes) -> int:
    """The item count checked against MAX_HEADER_ITEMS (brackets and commas inside strings count too)."""
    return raw.count(b"[") + raw.count(b"{") + raw.count(b",")


def default_checksum_algo() -> str:
    return "xxh3_64" if xxhash is not None else "crc32"


def checksum(buf: Any, algo: str) -> int:
    """Unsigned checksum, with the named algorithm, of a bytes-like object or of the concatenation of a list
    of them (segments; computed piece by piece, the same value as over the joined bytes)."""
    segs = buf if isinstance(buf, list | tuple) else [buf]
    if algo == "xxh3_64":
        if xxhash is None:
            raise ProtocolError("chunk uses xxh3_64 checksums but the xxhash package is not installed here")
        if len(segs) == 1:
            return int(xxhash.xxh3_64_intdigest(segs[0]))
        h = xxhash.xxh3_64()
        for s in segs:
            h.update(s)
        return int(h.intdigest())
    if algo == "crc32":
        c = 0
        for s in segs:
            c = zlib.crc32(s, c)
        return c
    raise ProtocolError(f"unknown checksum algorithm {algo!r}")


def tensor_nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def blob_header(entries: Sequence[tuple[str, Sequence[int], torch.dtype]],
                metadata: dict[str, str] | None = None) -> tuple[bytes, list[tuple[int, int]]]:
    """Padded JSON header and each entry's [begin, end) data offsets, in the given order."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = metadata
    offsets, pos = [], 0
    for name, shape, dtype in entries:
        if dtype not in _ST_NAMES:
            raise ValueError(f"tensor {name}: dtype {dtype} cannot go into a weight chunk; use one of "
                             f"{sorted(str(d) for d in _ST_NAMES)}")
        check_shape(list(shape), dtype.itemsize, f"tensor {name}")  # what read_blob accepts
        n = tensor_nbytes(shape, dtype)
        header[name] = {"dtype": _ST_NAMES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        offsets.append((pos, pos + n))
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # as safetensors: keeps the data section 8-byte aligned
    if len(raw) > MAX_HEADER_BYTES or header_items(raw) > MAX_HEADER_ITEMS:  # read_blob would refuse it
        raise ValueError(f"safetensors header of {len(entries)} tensors ({len(raw)} bytes, {header_items(raw)} "
                         f"items) is over MAX_HEADER_BYTES {MAX_HEADER_BYTES} or MAX_HEADER_ITEMS {MAX_HEADER_ITEMS}")
    return raw, offsets


class BlobPool:
    """Reusable chunk buffers for the sender.

    Fresh memory costs first-touch page faults, and on this machine filling a fresh 64 MiB buffer took
    ~8x longer than refilling a used one, so chunk buffers are recycled. A buffer is reused only when nothing
    references it any more: zmq (copy=False) holds a reference until the frame has left, and any memoryview
    or tensor over it keeps it too, so a reused buffer is never one still being sent or read.
    """

    def __init__(self, max_buffers: int = 16):
        self.max_buffers = max_buffers
        self._bufs: list[np.ndarray] = []

    def alloc(self, nbytes: int) -> memoryview:
        for buf in self._bufs:
            # 3 references = the list, the loop variable and getrefcount's argument: nobody else holds it.
            if nbytes <= buf.nbytes <= 2 * nbytes + (1 << 20) and sys.getrefcount(buf) <= 3:
                return buf.data[:nbytes]
        fresh = np.empty(max(nbytes, 1), dtype=np.uint8)  # uninitialised: every byte is written next
        if len(self._bufs) < self.max_buffers:
            self._bufs.append(fresh)
        return fresh.data[:nbytes]


BORROW_MIN_BYTES = 1 << 20
"""Tensors at least this large are sent as their own segment (a view of the tensor, no copy) when the caller
allows it; smaller ones are copied, runs of them into one segment: below ~1 MiB a frame of its own costs more
(one zmq message part, one allocation on the receiver) than the copy it saves."""


def write_blob(tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
               pool: BlobPool | None = None) -> memoryview:
    """One safetensors file in one fresh (or recycled) buffer; each tensor is copied exactly once."""
    (blob,) = write_segments(tensors, metadata, pool)
    return blob


def write_segments(tensors: Sequence[tuple[str, torch.Tensor]], metadata: dict[str, str] | None = None,
                   pool: BlobPool | None = None, borrow: Callable[[int], bool] | None = None) -> list[memoryview]:
    """One safetensors file as SEGMENTS: buffers whose concatenation is the file, each tensor wholly inside one.

    Tensors are laid out by decreasing element size, so every tensor starts aligned to its element size (in
    the file and in its segment). A contiguous CPU tensor `i` (index into `tensors`) of at least
    `BORROW_MIN_BYTES` for which `borrow(i)` is true becomes a segment that VIEWS its memory (zero copy: the
    caller must leave it unchanged until the segment has been sent); everything else, the header included, is
    copied once into (pooled) buffers, consecutive copies into one segment. Without `borrow` the result is a
    single segment: the whole file in one buffer. `borrow` is asked only about tensors that can be viewed.
    """
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i][1].element_size())
    raw, offsets = blob_header([(tensors[i][0], tuple(tensors[i][1].shape), tensors[i][1].dtype) for i in order],
                               metadata)
    lent = [borrow is not None and (e - b) >= BORROW_MIN_BYTES and tensors[i][1].is_contiguous()
            and tensors[i][1].device.type == "cpu" and borrow(i) for i, (b, e) in zip(order, offsets)]
    # Runs: (copy?, [positions in `order`]); the header starts the first copied run.
    runs: list[tuple[bool, list[int]]] = [(False, [])]
    for k, is_lent in enumerate(lent):
        if is_lent:
            runs.append((True, [k]))
        elif runs[-1][0]:
            runs.append((False, [k]))
        else:
            runs[-1][1].append(k)
    segments: list[memoryview] = []
    for is_lent, ks in runs:
        if is_lent:
            t = tensors[order[ks[0]]][1].detach()
            segments.append(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
            continue
        head = b"" if segments else struct.pack("<Q", len(raw)) + raw
        start = offsets[ks[0]][0] if ks else 0
        size = len(head) + sum(offsets[k][1] - offsets[k][0] for k in ks)
        if not size:
            continue
        buf = pool.alloc(size) if pool is not None else np.empty(size, dtype=np.uint8).data
        buf[:len(head)] = head
        for k in ks:
            (b, e), t = offsets[k], tensors[order[k]][1]
            if e > b:
                dst = torch.frombuffer(buf, dtype=torch.uint8, count=e - b, offset=len(head) + b - start)
                dst.copy_(t.detach().reshape(-1).contiguous().cpu().view(torch.uint8))
        segments.append(buf)
    return segments


def _segment_view(segs: list[memoryview], starts: list[int], begin: int, end: int) -> tuple[memoryview, int] | None:
    """(segment, offset in it) holding file bytes [begin, end), or None if they straddle segments."""
    j = bisect.bisect_right(starts, begin) - 1
    if j < 0 or end > starts[j] + segs[j].nbytes:
        return None
    return segs[j], begin - starts[j]


def _bytes_view(buf: Any) -> memoryview:
    try:
        return memoryview(buf).cast("B") if not isinstance(buf, memoryview) or buf.format != "B" else buf
    except TypeError:
        raise ProtocolError(f"blob segment of type {type(buf).__name__} is not a contiguous buffer") from None


def read_blob(buf: Any) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (viewing the memory of `buf`, no copy) and metadata of a safetensors blob, strictly checked:
    anything malformed (shapes included: `messages.check_shape`) raises ProtocolError and nothing else.
    `buf` is a bytes-like object or a list of segments (`write_segments`): the first holds the length prefix
    and the whole JSON header, and no tensor may straddle two segments."""
    segs = [_bytes_view(b) for b in (buf if isinstance(buf, list | tuple) else [buf])]
    if not segs:
        raise ProtocolError("safetensors blob has no segments")
    mv, size = segs[0], sum(s.nbytes for s in segs)
    starts = [0]
    for s in segs[:-1]:
        starts.append(starts[-1] + s.nbytes)
    if size < 8:
        raise ProtocolError(f"safetensors blob of {size} bytes is shorter than its 8-byte length prefix")
    if mv.nbytes < 8:
        raise ProtocolError(f"the first blob segment ({mv.nbytes} bytes) is shorter than the length prefix")
    (hlen,) = struct.unpack("<Q", mv[:8])
    if hlen > MAX_HEADER_BYTES:
        raise ProtocolError(f"safetensors header of {hlen} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes")
    if hlen > size - 8:
        raise ProtocolError(f"safetensors header length {hlen} does not fit a {size}-byte blob")
    if hlen > mv.nbytes - 8:
        raise ProtocolError(f"safetensors header of {hlen} bytes does not fit the first segment ({mv.nbytes} bytes)")
    raw = bytes(mv[8:8 + hlen])
    if header_items(raw) > MAX_HEADER_ITEMS:
        raise ProtocolError(f"safetensors header holds more than {MAX_HEADER_ITEMS} JSON items")
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ProtocolError(f"safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ProtocolError("safetensors header is not a JSON object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ProtocolError("safetensors __metadata__ must map strings to strings")
    data_start, data_len = 8 + hlen, size - 8 - hlen
    spans, out = [], {}
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise ProtocolError(f"safetensors entry {name!r:.100} is malformed")
        dtype = ST_DTYPES.get(info["dtype"]) if isinstance(info["dtype"], str) else None
        if dtype is None:
            raise ProtocolError(f"tensor {name!r:.100}: dtype {info['dtype']!r:.30} is not on the whitelist "
                                f"{sorted(ST_DTYPES)}")
        shape, offs = info["shape"], info["data_offsets"]
        check_shape(shape, dtype.itemsize, f"tensor {name!r:.100}")
        if (not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)
                or not 0 <= offs[0] <= offs[1] <= data_len):
            raise ProtocolError(f"tensor {name!r:.100}: data_offsets {offs!r:.100} outside the {data_len}-byte data")
        if offs[1] - offs[0] != tensor_nbytes(shape, dtype):
            raise ProtocolError(f"tensor {name!r:.100}: shape {shape} of {info['dtype']} does not match "
                                f"{offs[1] - offs[0]} data bytes")
        spans.append((offs[0], offs[1], name))
        numel = math.prod(shape)
        where = _segment_view(segs, starts, data_start + offs[0], data_start + offs[1]) if numel else (mv, 0)
        if where is None:
            raise ProtocolError(f"tensor {name!r:.100}: its bytes straddle two blob segments")
        try:  # check_shape made this safe; a torch error must still not escape as anything but ProtocolError
            with warnings.catch_warnings():  # read-only buffers (bytes) warn; received zmq frames are writable
                warnings.simplefilter("ignore", UserWarning)
                t = (torch.frombuffer(where[0], dtype=dtype, count=numel, offset=where[1]) if numel
                     else torch.empty(0, dtype=dtype))
            out[name] = t.reshape(shape)
        except (ValueError, TypeError, RuntimeError, OverflowError, MemoryError) as e:
            raise ProtocolError(f"tensor {name!r:.100}: cannot view {shape} of {info['dtype']}: "
                                f"{str(e).splitlines()[0]:.200}") from None
    pos = 0
    for begin, end, name in sorted(spans):
        if begin != pos:
            raise ProtocolError(f"tensor {name!r:.100}: data overlaps or leaves a hole at byte {pos}")
        pos = end
    if pos != data_len:
        raise ProtocolError(f"safetensors data has {data_len - pos} trailing bytes not owned by any tensor")
    return out, metadata
