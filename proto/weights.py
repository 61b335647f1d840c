"""Weight streaming: a state dict as versioned, checksummed safetensors chunks, and their reassembly.

Sender (learner rank 0): `WeightSender.publish(version, state_fn)` first PLANS the chunks from names,
shapes and dtypes only (so every chunk can say "i of n"), then walks `state_fn()` again tensor by tensor,
quantising linear weights to block-FP8 when asked, and serialises one bucket at a time: the sender holds
at most one chunk beyond the live weights, never a second full copy. A tensor larger than a chunk (an
embedding, lm_head) is sent as row pieces `name[begin:end]` listed in the chunk's safetensors metadata
(`SPLIT_KEY`), so chunks, zmq frames and the receiver's buffers stay bounded by `chunk_bytes`.

Every publish draws a random 64-bit `publish_id` (from the OS, not a seeded RNG) that all its chunks carry,
resends included; each blob's safetensors metadata repeats the chunk's header (`chunk_metadata`), so the
checksum covers version, publish id and chunk index as well as the tensors.

Late joiners: `WeightSender.resend()` streams the last published version again, under its publish id.
Two ways, chosen by `keep_blobs`:
- `keep_blobs=False` (default): re-serialise from the live state. Costs no memory, but the live state
  must still BE that version, so the learner answers WeightsRequests between steps (after publishing,
  before the next optimizer update). Each re-serialised chunk's checksum is compared with the published
  one, so a state that has moved on raises instead of sending different weights under an old number.
- `keep_blobs=True`: keep the published chunks (one extra serialised copy of the weights, in the
  sampler's precision: ~1 byte/param with FP8; two while the next version is being published) and resend
  them at any time, even mid-step.

Receiver (sampler): `WeightReceiver.feed(msg)` verifies each chunk's checksum, blob and header-vs-blob
metadata as it arrives (the next chunk is received meanwhile by zmq's I/O thread) and only then lets it
touch the assembly, so a corrupted chunk (say, a header claiming version 10**9) is dropped without
disturbing the version being assembled. It refuses chunks of versions older than the one it is assembling
or has applied; a chunk of a newer version, or of the same version from another publish (the learner died
mid-publish and published that version again from its checkpoint), starts the assembly over (counted in
`abandoned`): one version is never assembled from two publishes. It returns a `WeightSet` only when all
`n` chunks of a version are in and the tensor set is complete (and equals `expected_names` if given). The
tensors view the received frames.

    sender = WeightSender(chunk_bytes=16 << 20, fp8_block=128)
    for msg in sender.publish(version, lambda: iter_hf_state(model)): sock.send_multipart(encode(msg), copy=False)
    update = receiver.feed(decode(frames))   # None until complete, then WeightSet(version, tensors, ...)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from functools import partial

import torch
from minirl_async.proto.messages import ProtocolError, WeightUpdate
from minirl_async.proto.stblob import (
    MAX_CHUNK_TENSORS,
    BlobPool,
    checksum,
    default_checksum_algo,
    read_blob,
    tensor_nbytes,
    write_segments,
)

StateFn = Callable[[], Iterable[tuple[str, torch.Tensor]]]
SCALE_SUFFIX = "_scale_inv"  # same as minirl_async.models.fp8.SCALE_SUFFIX (HF FP8 checkpoint naming)
SPLIT_KEY = "minirl.split"  # chunk metadata: {piece name: [tensor name, row begin, row end, total rows]}
IDENTITY_KEYS = ("version", "publish_id", "chunk", "num_tensors", "fp8_block")


def new_publish_id() -> int:
    """A random unsigned 64-bit publish id from the OS. Never from `random`/torch: a learner restarted from
    a checkpoint restores those RNG states and would draw the id of the publish it died in."""
    return int.from_bytes(os.urandom(8), "little")


def chunk_metadata(version: int, publish_id: int, chunk_index: int, num_chunks: int, num_tensors: int,
                   fp8_block: int) -> dict[str, str]:
    """The safetensors metadata that binds a chunk's blob (and so its checksum) to its WeightUpdate header."""
    return {"version": str(version), "publish_id": f"{publish_id:016x}", "chunk": f"{chunk_index}/{num_chunks}",
            "num_tensors": str(num_tensors), "fp8_block": str(fp8_block)}


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one tensor: all the planner needs."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.shape, self.dtype)


@dataclass
class WeightSet:
    """A complete, verified weight update as handed to the engine."""

    version: int
    tensors: dict[str, torch.Tensor]
    fp8: bool
    fp8_block: int


@dataclass(frozen=True)
class _Piece:
    """One tensor of a chunk: a whole wire tensor, or rows [begin, end) of one larger than a chunk."""

    source: int  # index of the source tensor in state_fn order
    wire: TensorSpec
    rows: tuple[int, int] | None = None

    @property
    def name(self) -> str:
        return self.wire.name if self.rows is None else f"{self.wire.name}[{self.rows[0]}:{self.rows[1]}]"

    @property
    def nbytes(self) -> int:
        if self.rows is None:
            return self.wire.nbytes
        return self.wire.nbytes // self.wire.shape[0] * (self.rows[1] - self.rows[0])


@dataclass
class _Plan:
    version: int
    publish_id: int  # drawn once per publish; resends of this plan carry it too
    sources: list[TensorSpec]  # the state's tensors, in state_fn order
    buckets: list[list[_Piece]]  # what each chunk holds
    num_tensors: int  # whole tensors on the wire (a quantised weight counts twice: weight + scale)
    checksums: list[int] = field(default_factory=list)
    blobs: list[list[memoryview]] = field(default_factory=list)


def _default_fp8_filter(name: str) -> bool:
    from minirl_async.models.fp8 import should_quantize

    return should_quantize(name)


def _default_quantize(w: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    from minirl_async.models.fp8 import quantize_block_fp8

    return quantize_block_fp8(w, block)


class WeightSender:
    """Plans and serialises weight chunks; keeps the last plan for late joiners (see module docstring)."""

    def __init__(self, chunk_bytes: int, *, fp8_block: int = 0, dtype: torch.dtype | None = None,
                 keep_blobs: bool = False, checksum_algo: str | None = None,
                 fp8_filter: Callable[[str], bool] | None = None,
                 quantize: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]] | None = None):
        """chunk_bytes: target chunk size; fp8_block > 0 quantises what `fp8_filter` selects (default: the
        HF projections, as `models.fp8.should_quantize`); dtype: cast other floating tensors (e.g. bf16)."""
        if chunk_bytes < 1:
            raise ValueError(f"chunk_bytes must be >= 1, got {chunk_bytes}")
        if fp8_block < 0:
            raise ValueError(f"fp8_block must be >= 0 (0 = no FP8), got {fp8_block}")
        self.chunk_bytes = chunk_bytes
        self.fp8_block = fp8_block
        self.dtype = dtype
        self.keep_blobs = keep_blobs
        self.checksum_algo = checksum_algo or default_checksum_algo()
        self.fp8_filter = fp8_filter or _default_fp8_filter
        self.quantize = quantize or _default_quantize
        self._plan: _Plan | None = None  # the last completely published version
        self._state_fn: StateFn | None = None
        self.publishing = False  # a publish() generator is running
        self.views_live = False  # the chunk last yielded views the live state (see publish())
        # Recycled chunk buffers (kept blobs are never recycled: they stay referenced).
        self._pool = BlobPool() if not keep_blobs else None

    @property
    def last_version(self) -> int:
        """Version of the last completed publish, -1 before the first."""
        return self._plan.version if self._plan is not None else -1

    # ------------------------------------------------------------ planning (names, shapes, dtypes only)
    def _wire_specs(self, s: TensorSpec) -> list[TensorSpec]:
        if self.fp8_block and len(s.shape) == 2 and self.fp8_filter(s.name):
            b = self.fp8_block
            scale = (-(-s.shape[0] // b), -(-s.shape[1] // b))
            return [TensorSpec(s.name, s.shape, torch.float8_e4m3fn),
                    TensorSpec(s.name + SCALE_SUFFIX, scale, torch.float32)]
        if self.dtype is not None and s.dtype.is_floating_point:
            return [TensorSpec(s.name, s.shape, self.dtype)]
        return [s]

    def _pieces(self, index: int, wire: TensorSpec) -> list[_Piece]:
        """A tensor larger than a chunk is split into row ranges so no chunk (and no zmq frame) is much
        larger than `chunk_bytes`; the receiver reassembles it."""
        rows = wire.shape[0] if wire.shape else 0
        if wire.nbytes <= self.chunk_bytes or rows < 2:
            return [_Piece(index, wire)]
        step = max(1, self.chunk_bytes // (wire.nbytes // rows))
        return [_Piece(index, wire, (r, min(r + step, rows))) for r in range(0, rows, step)]

    def plan(self, version: int, specs: Iterable[TensorSpec]) -> _Plan:
        """Greedy buckets of at most `chunk_bytes` wire bytes (or one row, if a row is larger) and at most
        `stblob.MAX_CHUNK_TENSORS` tensors (pieces), so every chunk header is within what `read_blob` accepts."""
        sources = list(specs)
        buckets: list[list[_Piece]] = [[]]
        size, num_tensors, names = 0, 0, set()
        for index, s in enumerate(sources):
            if s.name in names:
                raise ValueError(f"tensor {s.name} appears twice in the state")
            names.add(s.name)
            for wire in self._wire_specs(s):
                num_tensors += 1
                for piece in self._pieces(index, wire):
                    if buckets[-1] and (size + piece.nbytes > self.chunk_bytes or len(buckets[-1]) >= MAX_CHUNK_TENSORS):
                        buckets.append([])
                        size = 0
                    buckets[-1].append(piece)
                    size += piece.nbytes
        if num_tensors == 0:
            raise ValueError("cannot publish an empty state")
        return _Plan(version, new_publish_id(), sources, buckets, num_tensors)

    # ------------------------------------------------------------ streaming
    def publish(self, version: int, state_fn: StateFn, specs: Iterable[TensorSpec] | None = None
                ) -> Iterator[WeightUpdate]:
        """Chunks of `version`. `state_fn()` yields (name, tensor) in a fixed order; without `specs` it is
        called once more, first, to read names/shapes/dtypes (cheap for live parameters).

        Zero copy: a chunk's large tensors are segments VIEWING the tensors `state_fn` yielded, or the sender's
        own cast/quantised copies of them. Without `keep_blobs`, `views_live` is true after yielding a chunk that
        views the yielded tensors themselves: they must then stay unchanged (and not be reused as buffers by
        `state_fn`) until zmq has sent that chunk (`WeightPublisher` tracks the sends and `hold_weights()`
        waits for them). With `keep_blobs` such tensors are copied into the kept chunk instead."""
        if self._plan is not None and version <= self._plan.version:
            raise ValueError(f"version {version} is not newer than the last published {self._plan.version}")
        if specs is None:
            specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in state_fn()]
        plan = self.plan(version, specs)
        self.publishing = True  # until the last chunk is out, resend() still serves the previous version
        try:
            for msg, blob in self._serialise(plan, state_fn):
                plan.checksums.append(msg.checksum)
                if self.keep_blobs:
                    plan.blobs.append(blob)
                yield msg
        finally:
            self.publishing = False
        self._plan, self._state_fn = plan, state_fn

    def resend(self) -> Iterator[WeightUpdate]:
        """The last published version's chunks again, under its publish id (from kept blobs, or
        re-serialised and verified)."""
        plan = self._plan
        if plan is None:
            raise ValueError("nothing published yet")
        if self.keep_blobs:
            for i, blob in enumerate(plan.blobs):
                yield self._message(plan, i, blob, plan.checksums[i])
            return
        assert self._state_fn is not None
        for msg, _ in self._serialise(plan, self._state_fn):
            if msg.checksum != plan.checksums[msg.chunk_index]:
                raise RuntimeError(
                    f"weights changed since version {plan.version} was published (chunk {msg.chunk_index} differs); "
                    "answer WeightsRequests between steps or use keep_blobs=True")
            yield msg

    def _message(self, plan: _Plan, index: int, blob: list[memoryview], csum: int) -> WeightUpdate:
        return WeightUpdate(version=plan.version, publish_id=plan.publish_id, chunk_index=index,
                            num_chunks=len(plan.buckets), num_tensors=plan.num_tensors, blob=blob, checksum=csum,
                            checksum_algo=self.checksum_algo, fp8=self.fp8_block > 0, fp8_block=self.fp8_block)

    def _serialise(self, plan: _Plan, state_fn: StateFn) -> Iterator[tuple[WeightUpdate, list[memoryview]]]:
        it = iter(state_fn())
        current = -1  # the source tensor being sent (its pieces may span chunks)
        wire_tensors: dict[str, tuple[torch.Tensor, bool]] = {}
        for index, bucket in enumerate(plan.buckets):
            tensors: list[tuple[str, torch.Tensor]] = []
            fresh_flags: list[bool] = []
            splits: dict[str, list] = {}
            for piece in bucket:
                while current < piece.source:
                    current += 1
                    spec = plan.sources[current]
                    item = next(it, None)
                    if item is None:
                        raise ValueError(f"state ended before {spec.name}; state_fn must yield the planned tensors")
                    name, t = item
                    if name != spec.name or tuple(t.shape) != spec.shape or t.dtype != spec.dtype:
                        raise ValueError(f"state yielded {name} {tuple(t.shape)} {t.dtype} where the plan has "
                                         f"{spec.name} {spec.shape} {spec.dtype}; state_fn must be deterministic")
                    made = self._wire_tensors(spec, t)
                    wire_tensors = {n: (x, x is not t) for n, x in made}
                t, fresh = wire_tensors[piece.wire.name]
                if piece.rows is not None:
                    t = t[piece.rows[0]:piece.rows[1]]
                    splits[piece.name] = [piece.wire.name, piece.rows[0], piece.rows[1], piece.wire.shape[0]]
                tensors.append((piece.name, t))
                fresh_flags.append(fresh)
            meta = chunk_metadata(plan.version, plan.publish_id, index, len(plan.buckets), plan.num_tensors,
                                  self.fp8_block)
            if splits:
                meta[SPLIT_KEY] = json.dumps(splits)
            lent_live: list[int] = []
            blob = write_segments(tensors, meta, self._pool, borrow=partial(self._borrow, fresh_flags, lent_live))
            self.views_live = bool(lent_live)
            yield self._message(plan, index, blob, checksum(blob, self.checksum_algo)), blob
        if next(it, None) is not None:
            raise ValueError("state yielded more tensors than planned; state_fn must be deterministic")

    def _borrow(self, fresh: list[bool], lent_live: list[int], i: int) -> bool:
        """May chunk tensor `i` be a zero-copy segment? Tensors made here (cast, quantised): yes; the live
        state's own: yes unless chunks are kept for later resends (those must not change with the state)."""
        if fresh[i]:
            return True
        if self.keep_blobs:
            return False
        lent_live.append(i)
        return True

    def _wire_tensors(self, spec: TensorSpec, t: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        wire = self._wire_specs(spec)
        if len(wire) == 2:
            q, s = self.quantize(t, self.fp8_block)
            out = [(wire[0].name, q), (wire[1].name, s)]
        else:
            out = [(spec.name, t.to(wire[0].dtype) if t.dtype != wire[0].dtype else t)]
        for (n, x), w in zip(out, wire):
            assert tuple(x.shape) == w.shape and x.dtype == w.dtype, f"{n}: {tuple(x.shape)} {x.dtype} != plan {w}"
        return out


class WeightReceiver:
    """Assembles chunks into a complete, verified `WeightSet` (see module docstring for the rules)."""

    def __init__(self, expected_names: Collection[str] | None = None, version: int = -1):
        self.expected_names = frozenset(expected_names) if expected_names is not None else None
        self.version = version  # last complete version handed over (-1: none)
        self.abandoned = 0  # assemblies given up because a newer version or another publish started
        self._pending: WeightUpdate | None = None  # first chunk seen of the publish being assembled
        self._chunks: dict[int, dict[str, torch.Tensor]] = {}  # whole tensors of each chunk
        self._parts: dict[str, list[tuple[int, int, int, torch.Tensor]]] = {}  # row pieces of split tensors

    @property
    def pending_version(self) -> int | None:
        return self._pending.version if self._pending is not None else None

    @property
    def pending_publish_id(self) -> int | None:
        return self._pending.publish_id if self._pending is not None else None

    def missing_chunks(self) -> list[int]:
        """Chunk indices still missing for the version being assembled (re-request after a timeout)."""
        if self._pending is None:
            return []
        return [i for i in range(self._pending.num_chunks) if i not in self._chunks]

    def feed(self, msg: WeightUpdate) -> WeightSet | None:
        """Take one chunk; the complete update once its last chunk arrives. Bad chunks raise ProtocolError
        and leave the assembly as it was (module docstring)."""
        where = (f"weight chunk {msg.chunk_index}/{msg.num_chunks} of version {msg.version} "
                 f"(publish {msg.publish_id:016x})")
        if msg.version <= self.version:
            raise ProtocolError(f"{where}: version {self.version} is already applied; dropping the older chunk")
        p = self._pending
        if p is not None and msg.version < p.version:
            raise ProtocolError(f"{where}: interleaved with newer version {p.version} being assembled; dropped")
        # A newer version, or the same version from another publish, replaces the assembly; but only once
        # the chunk has proved good: until then nothing below may change the receiver's state.
        fresh = p is None or msg.version > p.version or msg.publish_id != p.publish_id
        if p is not None and not fresh:
            if (msg.num_chunks, msg.num_tensors, msg.fp8, msg.fp8_block) != (
                    p.num_chunks, p.num_tensors, p.fp8, p.fp8_block):
                raise ProtocolError(f"{where}: num_chunks/num_tensors/fp8 disagree with the publish's first chunk")
            if msg.chunk_index in self._chunks:
                raise ProtocolError(f"{where}: duplicate chunk")
        got = checksum(msg.blob, msg.checksum_algo)
        if got != msg.checksum:
            raise ProtocolError(f"{where}: {msg.checksum_algo} checksum mismatch (computed {got:#x}, "
                                f"sent {msg.checksum:#x}); chunk dropped")
        tensors, meta = read_blob(msg.blob)
        self._check_identity(msg, meta, where)
        pieces = self._split_pieces(tensors, meta, where)
        if not fresh:
            for name in tensors:
                if any(name in c for c in self._chunks.values()):
                    raise ProtocolError(f"{where}: tensor {name} already arrived in another chunk")
        # The chunk is good: from here on the state changes.
        if fresh:
            if p is not None:
                self.abandoned += 1
            self._pending, self._chunks, self._parts, p = msg, {}, {}, msg
        assert p is not None
        for name, begin, end, total, piece in pieces:
            del tensors[f"{name}[{begin}:{end}]"]
            self._parts.setdefault(name, []).append((begin, end, total, piece))
        self._chunks[msg.chunk_index] = tensors
        if len(self._chunks) < p.num_chunks:
            return None
        return self._complete(p, where)

    @staticmethod
    def _check_identity(msg: WeightUpdate, meta: dict[str, str], where: str) -> None:
        """The blob's metadata (covered by the checksum) must repeat the header (which is not)."""
        expected = chunk_metadata(msg.version, msg.publish_id, msg.chunk_index, msg.num_chunks, msg.num_tensors,
                                  msg.fp8_block)
        got = {k: meta.get(k) for k in IDENTITY_KEYS}
        if got != expected:
            raise ProtocolError(f"{where}: the header disagrees with the checksummed blob metadata "
                                f"{ {k: v for k, v in got.items() if v != expected[k]}!r:.300}; chunk dropped")
        extra = meta.keys() - {*IDENTITY_KEYS, SPLIT_KEY}
        if extra:
            raise ProtocolError(f"{where}: unexpected blob metadata key(s) {sorted(extra)!r:.200}")

    @staticmethod
    def _split_pieces(tensors: dict[str, torch.Tensor], meta: dict[str, str], where: str) -> list[tuple]:
        """(name, begin, end, total_rows, tensor) of each row piece the chunk's metadata declares."""
        if SPLIT_KEY not in meta:
            return []
        try:
            splits = json.loads(meta[SPLIT_KEY])
        except (ValueError, RecursionError):
            raise ProtocolError(f"{where}: split metadata is not JSON") from None
        if not isinstance(splits, dict):
            raise ProtocolError(f"{where}: split metadata must be a JSON object")
        out = []
        for piece_name, spec in splits.items():
            if not (isinstance(spec, list) and len(spec) == 4 and isinstance(spec[0], str)
                    and all(type(x) is int for x in spec[1:])):
                raise ProtocolError(f"{where}: split entry {piece_name!r:.100} must be [name, begin, end, rows]")
            name, begin, end, total = spec
            t = tensors.get(piece_name)
            if piece_name != f"{name}[{begin}:{end}]" or t is None:
                raise ProtocolError(f"{where}: split entry {piece_name!r:.100} does not name a tensor of the chunk")
            if not (0 <= begin < end <= total) or t.dim() == 0 or t.shape[0] != end - begin:
                raise ProtocolError(f"{where}: piece {piece_name!r:.100} has {t.shape[0] if t.dim() else 0} rows "
                                    f"for range [{begin}, {end}) of {total}")
            out.append((name, begin, end, total, t))
        return out

    @staticmethod
    def _join(name: str, parts: list[tuple[int, int, int, torch.Tensor]], where: str) -> torch.Tensor:
        parts = sorted(parts, key=lambda x: x[0])
        total, first = parts[0][2], parts[0][3]
        pos = 0
        for begin, end, rows, t in parts:
            if begin != pos or rows != total or t.dtype != first.dtype or t.shape[1:] != first.shape[1:]:
                raise ProtocolError(f"{where}: the row pieces of {name} overlap, leave a gap or disagree")
            pos = end
        if pos != total:
            raise ProtocolError(f"{where}: the row pieces of {name} cover {pos} of {total} rows")
        out = torch.empty((total, *first.shape[1:]), dtype=first.dtype)
        for begin, end, _, t in parts:
            out[begin:end].copy_(t)
        return out

    def _complete(self, p: WeightUpdate, where: str) -> WeightSet:
        merged: dict[str, torch.Tensor] = {}
        for i in range(p.num_chunks):
            merged.update(self._chunks[i])
        parts, self._pending, self._chunks, self._parts = self._parts, None, {}, {}
        for name, pieces in parts.items():
            if name in merged:
                raise ProtocolError(f"{where}: {name} arrived both whole and in row pieces")
            merged[name] = self._join(name, pieces, where)
        if len(merged) != p.num_tensors:
            raise ProtocolError(f"{where}: {len(merged)} tensors arrived, the sender announced {p.num_tensors}")
        if self.expected_names is not None and set(merged) != self.expected_names:
            missing = sorted(self.expected_names - merged.keys())[:5]
            extra = sorted(merged.keys() - self.expected_names)[:5]
            raise ProtocolError(f"{where}: tensor set differs from the expected one (missing {missing}, extra {extra})")
        self.version = p.version
        return WeightSet(p.version, merged, p.fp8, p.fp8_block)
