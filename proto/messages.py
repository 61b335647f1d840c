"""Wire message types: one dataclass per message, each documenting and checking its invariants.

Arrays are held as numpy arrays (the canonical in-memory type: graders need no torch); `as_torch(a)`
turns one into a torch tensor without a copy. Constructors accept lists, numpy arrays or CPU torch
tensors and convert them to the field's canonical dtype, so services can build messages from whatever
they hold; integers are never wrapped or truncated (a value no allowed dtype holds raises ProtocolError). `validate()` checks the cross-field invariants and raises `ProtocolError`; the codec calls it on
encode (a service cannot send a malformed message) and on decode (a peer cannot make us accept one).

Shape legend: P prompt tokens, R response tokens, G responses per group, L MoE layers, K top-k experts.

    from minirl_async.proto.messages import RolloutGroup, Response
    from minirl_async.proto.codec import encode, decode
    msg = decode(encode(WorkRequest(sampler_id="s0", free_slots=8, weight_version=3)))
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

PROTO_VERSION = 3
"""Bumped on any change of a message's fields or meaning; peers with another number are refused.
2: WeightUpdate.publish_id, and a chunk's blob metadata repeats its header (see WeightUpdate).
3: WeightUpdate.blob travels as segments (one frame each) whose concatenation is the safetensors file."""

FINISH_REASONS = ("stop", "length", "abort")
CHECKSUM_ALGOS = ("xxh3_64", "crc32")
Buffer = bytes | bytearray | memoryview
Segments = list[Buffer]
"""A byte string sent as several frames (zero-copy views of separate buffers); its bytes are their concatenation."""


class ProtocolError(ValueError):
    """A message that breaks the protocol; the receiving service logs it, counts it, drops it, goes on."""


MAX_NDIM = 8
"""Most dimensions an array (a message field, a blob, a tensor of a weight chunk) may have on the wire."""
MAX_DIM = 1 << 31
"""Every dimension of an array on the wire is below this (so is a blob's byte length)."""


def check_shape(shape: Any, itemsize: int, what: str) -> list[int]:
    """`shape` if it is a valid wire shape, else ProtocolError: a list of at most MAX_NDIM ints, each in
    [0, MAX_DIM), whose extent (the product with zero dimensions counted as 1) times `itemsize` is below
    2**63. The last rule is what numpy and torch need to compute strides: without it an empty array of
    shape [0, 2**62, 4] passes a byte-size check (0 bytes) and then fails inside numpy or torch."""
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise ProtocolError(f"{what}: shape must be a list of ints, got {shape!r:.100}")
    if len(shape) > MAX_NDIM:
        raise ProtocolError(f"{what}: shape has {len(shape)} dimensions, at most {MAX_NDIM} are allowed")
    if not all(0 <= d < MAX_DIM for d in shape):
        raise ProtocolError(f"{what}: every dimension must be in [0, 2**31), got shape {shape!r:.100}")
    if math.prod(max(d, 1) for d in shape) * itemsize >= 1 << 63:
        raise ProtocolError(f"{what}: shape {shape} is too large to index (even with a zero dimension)")
    return shape


def tensor_field(dtypes: tuple[str, ...], ndim: int, finite: bool = False, optional: bool = False) -> Any:
    """A numpy-array field: allowed dtypes (the first is canonical), rank, finite-only, may be None."""
    meta = {"tensor": True, "dtypes": dtypes, "ndim": ndim, "finite": finite, "optional": optional}
    if optional:
        return field(default=None, metadata=meta)
    return field(metadata=meta)


def as_torch(a: np.ndarray) -> Any:
    """Zero-copy torch view of a message array (shares memory: do not write to it in place)."""
    import torch

    return torch.from_numpy(a)


def _to_array(x: Any, dtypes: tuple[str, ...], name: str) -> np.ndarray:
    """`x` as an array of one of `dtypes` (kept if already one, else the first that holds every value
    exactly). Integer fields never wrap or truncate: values outside every allowed dtype's range, or
    non-integral floats, raise ProtocolError naming the field (routes of expert 300 become uint16, not 44).
    Float fields may round (float64 -> float32 is the intended narrowing; finiteness is checked by validate)."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu()
        try:
            x = x.numpy()  # zero-copy for CPU tensors
        except TypeError:  # bfloat16 / float8 have no numpy dtype
            x = x.float().numpy()
    try:
        a = np.asarray(x)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{name}: cannot be turned into an array: {e}") from None
    if a.dtype.name in dtypes:
        return a
    if a.dtype.kind not in "biuf":
        raise ProtocolError(f"{name}: needs numbers ({'/'.join(dtypes)}), got an array of {a.dtype}")
    if np.dtype(dtypes[0]).kind == "f":
        return a.astype(dtypes[0])
    # integer field: find the value range exactly (in Python ints), refusing non-integral floats
    if a.size == 0:
        return a.astype(dtypes[0])
    if a.dtype.kind == "f":
        if not (np.isfinite(a).all() and (a == np.floor(a)).all()):
            raise ProtocolError(f"{name}: holds non-integral or non-finite values; expected integers")
    lo, hi = int(a.min()), int(a.max())
    for dt in dtypes:
        info = np.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return a.astype(dt)
    raise ProtocolError(f"{name}: values span [{lo}, {hi}], which does not fit {'/'.join(dtypes)} "
                        "(refusing to wrap them)")


class _Message:
    """Base: converts array fields on construction; subclasses add `validate()` checks."""

    TYPE: ClassVar[str]

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if f.metadata.get("tensor"):
                v = getattr(self, f.name)
                if v is not None:
                    where = f"{type(self).__name__}.{f.name}"
                    setattr(self, f.name, _to_array(v, f.metadata["dtypes"], where))

    def validate(self) -> None:
        """Raise ProtocolError if an invariant does not hold."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ProtocolError(msg)


def _check_id(value: str, what: str) -> None:
    _check(0 < len(value) <= 256, f"{what} must be 1..256 characters, got {len(value)}")


@dataclass(kw_only=True, eq=False)
class WorkRequest(_Message):
    """Sampler -> learner (DEALER -> ROUTER): "I can take `free_slots` more responses".

    Invariants: `free_slots >= 0`; `weight_version >= -1` (-1: no weights loaded yet).
    """

    TYPE: ClassVar[str] = "WorkRequest"
    sampler_id: str
    free_slots: int
    weight_version: int

    def validate(self) -> None:
        _check_id(self.sampler_id, "sampler_id")
        _check(self.free_slots >= 0, f"free_slots must be >= 0, got {self.free_slots}")
        _check(self.weight_version >= -1, f"weight_version must be >= -1, got {self.weight_version}")


@dataclass(kw_only=True, eq=False)
class PromptGroup(_Message):
    """One prompt to sample `group_size` responses for (part of a WorkGrant).

    Invariants: non-empty `group_id`; `attempt >= 0` (re-issues count up); `prompt_ids` int32 [P], P >= 1;
    `group_size >= 1`; `meta` is task metadata (JSON-like, e.g. {"answer": "42"}), passed through untouched.
    """

    TYPE: ClassVar[str] = "PromptGroup"
    group_id: str
    attempt: int
    prompt_ids: np.ndarray = tensor_field(("int32",), ndim=1)  # [P]
    meta: dict[str, Any] = field(default_factory=dict)
    group_size: int

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        _check(self.attempt >= 0, f"attempt must be >= 0, got {self.attempt}")
        _check(self.prompt_ids.size >= 1, f"group {self.group_id}: prompt_ids is empty")
        _check(self.group_size >= 1, f"group {self.group_id}: group_size must be >= 1, got {self.group_size}")


@dataclass(kw_only=True, eq=False)
class WorkGrant(_Message):
    """Learner -> sampler (ROUTER -> DEALER): prompt groups to sample, or "come back in backoff_s".

    Invariants: exactly one of (`groups` non-empty, `backoff_s > 0`); group ids unique within the grant.
    """

    TYPE: ClassVar[str] = "WorkGrant"
    groups: list[PromptGroup] = field(default_factory=list)
    backoff_s: float = 0.0

    def validate(self) -> None:
        _check(math.isfinite(self.backoff_s) and self.backoff_s >= 0, f"backoff_s must be >= 0, got {self.backoff_s}")
        _check(bool(self.groups) != (self.backoff_s > 0),
               f"a WorkGrant carries either groups or a backoff_s > 0 (got {len(self.groups)} groups, "
               f"backoff_s={self.backoff_s})")
        ids = [g.group_id for g in self.groups]
        _check(len(set(ids)) == len(ids), "duplicate group_id in one WorkGrant")
        for g in self.groups:
            g.validate()


@dataclass(kw_only=True, eq=False)
class Response(_Message):
    """One sampled response (part of a RolloutGroup).

    Invariants: `response_ids` int32 [R], `logprobs` float32 [R] finite (sampler log-prob of each sampled
    token under logits/temperature), `versions` int32 [R] >= 0 (weight version that produced each token);
    `routes` [P+R-1, L, K] unsigned expert indices (uint8 up to 256 experts) or None when not captured;
    `finish_reason` in {"stop", "length", "abort"}.
    """

    TYPE: ClassVar[str] = "Response"
    response_ids: np.ndarray = tensor_field(("int32",), ndim=1)  # [R]
    logprobs: np.ndarray = tensor_field(("float32",), ndim=1, finite=True)  # [R]
    versions: np.ndarray = tensor_field(("int32",), ndim=1)  # [R]
    routes: np.ndarray | None = tensor_field(("uint8", "uint16", "int16", "int32"), ndim=3, optional=True)
    finish_reason: str

    @property
    def length(self) -> int:
        """R, the number of response tokens."""
        return int(self.response_ids.shape[0])

    def validate_for(self, num_prompt: int, where: str) -> None:
        n = self.length
        _check(self.logprobs.shape[0] == n and self.versions.shape[0] == n,
               f"{where}: response_ids, logprobs, versions must share one length, got "
               f"{n}, {self.logprobs.shape[0]}, {self.versions.shape[0]}")
        _check(self.finish_reason in FINISH_REASONS,
               f"{where}: finish_reason {self.finish_reason!r} is not one of {FINISH_REASONS}")
        _check(n == 0 or int(self.versions.min()) >= 0, f"{where}: negative weight version")
        if self.routes is not None:
            _check(self.routes.shape[0] == num_prompt + n - 1,
                   f"{where}: routes have {self.routes.shape[0]} rows, expected prompt+response-1 = "
                   f"{num_prompt + n - 1}")
            if self.routes.dtype.kind == "i":  # unsigned routes (the usual uint8) need no scan
                _check(self.routes.size == 0 or int(self.routes.min()) >= 0, f"{where}: negative expert index")


@dataclass(kw_only=True, eq=False)
class RolloutGroup(_Message):
    """Sampler -> grader (PUSH -> PULL): all G responses to one prompt group.

    Invariants: G = len(responses) >= 1; each response satisfies Response's invariants against this
    group's P; routes are present for all responses or none, with one (L, K) for the whole group;
    `timings` maps names to finite seconds.
    """

    TYPE: ClassVar[str] = "RolloutGroup"
    group_id: str
    attempt: int
    prompt_ids: np.ndarray = tensor_field(("int32",), ndim=1)  # [P]
    meta: dict[str, Any] = field(default_factory=dict)
    sampler_id: str
    responses: list[Response]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def group_size(self) -> int:
        """G, the number of responses."""
        return len(self.responses)

    @property
    def num_response_tokens(self) -> int:
        return sum(r.length for r in self.responses)

    @property
    def min_version(self) -> int:
        """Oldest weight version of any token (the staleness guard's input); -1 if no tokens."""
        vs = [int(r.versions.min()) for r in self.responses if r.length]
        return min(vs) if vs else -1

    @property
    def max_version(self) -> int:
        vs = [int(r.versions.max()) for r in self.responses if r.length]
        return max(vs) if vs else -1

    def validate(self) -> None:
        _check_id(self.group_id, "group_id")
        _check_id(self.sampler_id, "sampler_id")
        _check(self.attempt >= 0, f"attempt must be >= 0, got {self.attempt}")
        _check(self.prompt_ids.size >= 1, f"group {self.group_id}: prompt_ids is empty")
        _check(len(self.responses) >= 1, f"group {self.group_id}: no responses")
        num_prompt = int(self.prompt_ids.shape[0])
        for i, r in enumerate(self.responses):
            r.validate_for(num_prompt, f"group {self.group_id} response {i}")
        with_routes = {r.routes is not None for r in self.responses}
        _check(len(with_routes) == 1, f"group {self.group_id}: routes present for some responses only")
        if True in with_routes:
            lk = {r.routes.shape[1:] for r in self.responses if r.routes is not None}
            _check(len(lk) == 1, f"group {self.group_id}: responses disagree on routes (L, K): {sorted(lk)}")
        for k, v in self.timings.items():
            _check(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
                   f"timings[{k!r}] must be a finite number of seconds, got {v!r}")


@dataclass(kw_only=True, eq=False)
class ScoredGroup(RolloutGroup):
    """Grader -> learner (PUSH -> PULL): a RolloutGroup plus one reward per response.

    Invariants: those of RolloutGroup; `rewards` float32 [G] finite; `grader_info` JSON-like;
    `grader_errors` lists what went wrong while grading (empty when all graded cleanly).
    """

    TYPE: ClassVar[str] = "ScoredGroup"
    rewards: np.ndarray = tensor_field(("float32",), ndim=1, finite=True)  # [G]
    grader_info: dict[str, Any] = field(default_factory=dict)
    grader_errors: list[str] = field(default_factory=list)

    @classmethod
    def from_rollout(cls, group: RolloutGroup, rewards: Any, grader_info: dict[str, Any] | None = None,
                     grader_errors: list[str] | None = None) -> ScoredGroup:
        """Attach rewards to a RolloutGroup (arrays are shared, not copied)."""
        base = {f.name: getattr(group, f.name) for f in dataclasses.fields(RolloutGroup)}
        return cls(**base, rewards=rewards, grader_info=dict(grader_info or {}),
                   grader_errors=list(grader_errors or []))

    def rollout(self) -> RolloutGroup:
        """The RolloutGroup part (arrays shared)."""
        return RolloutGroup(**{f.name: getattr(self, f.name) for f in dataclasses.fields(RolloutGroup)})

    def validate(self) -> None:
        super().validate()
        _check(self.rewards.shape[0] == len(self.responses),
               f"group {self.group_id}: {self.rewards.shape[0]} rewards for {len(self.responses)} responses")


@dataclass(kw_only=True, eq=False)
class WeightUpdate(_Message):
    """Learner -> samplers (XPUB -> SUB, or one subscriber's topic): chunk `chunk_index` of `num_chunks`.

    Invariants: `version >= 0`; `0 <= chunk_index < num_chunks`; `blob` is a safetensors file (sent as
    one or more segments, a frame each: the first holds the whole header, no tensor straddles two) whose
    `checksum_algo` checksum is `checksum`; the `num_chunks` blobs of one version hold `num_tensors` distinct tensors in total. With `fp8`, linear weights are float8_e4m3fn with a float32
    `<name>_scale_inv` per `fp8_block` x `fp8_block` tile; otherwise `fp8_block` is 0.

    `publish_id` (unsigned 64-bit) names one publish: the sender draws it at random from the OS (never
    from a seeded RNG, so a learner restarted from a checkpoint cannot draw the same id again) for every
    publish; all chunks of that publish, and every resend of it, carry the same id. Chunks of one version
    with different ids come from different publishes (a learner that died mid-publish and published that
    version again) and are never assembled together: a receiver that sees another id for the version it
    is assembling starts that version over.

    The blob's safetensors `__metadata__` repeats the header (`weights.chunk_metadata`: "version",
    "publish_id" as 16 hex digits, "chunk" as "i/n", "num_tensors", "fp8_block"), so the checksum covers
    those fields too: a receiver refuses a chunk whose header disagrees with its blob. The only other
    metadata key allowed is `weights.SPLIT_KEY` (row pieces of a tensor larger than a chunk).
    """

    TYPE: ClassVar[str] = "WeightUpdate"
    version: int
    publish_id: int
    chunk_index: int
    num_chunks: int
    num_tensors: int
    blob: Segments   # a single buffer given here is taken as one segment
    checksum: int
    checksum_algo: str
    fp8: bool = False
    fp8_block: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.blob, bytes | bytearray | memoryview):
            self.blob = [self.blob]

    def validate(self) -> None:
        _check(self.version >= 0, f"version must be >= 0, got {self.version}")
        _check(0 <= self.publish_id < 1 << 64, "publish_id must be an unsigned 64-bit integer")
        _check(isinstance(self.blob, list) and len(self.blob) >= 1, "blob must be one or more segments")
        _check(0 <= self.chunk_index < self.num_chunks,
               f"chunk_index {self.chunk_index} is outside 0..num_chunks-1 ({self.num_chunks})")
        _check(self.num_tensors >= 1, f"num_tensors must be >= 1, got {self.num_tensors}")
        _check(0 <= self.checksum < 1 << 64, "checksum must be an unsigned 64-bit integer")
        _check(self.checksum_algo in CHECKSUM_ALGOS,
               f"checksum_algo {self.checksum_algo!r} is not one of {CHECKSUM_ALGOS}")
        if self.fp8:
            _check(self.fp8_block >= 1, f"an fp8 chunk needs fp8_block >= 1, got {self.fp8_block}")
        else:
            _check(self.fp8_block == 0, f"fp8_block must be 0 for a non-fp8 chunk, got {self.fp8_block}")


@dataclass(kw_only=True, eq=False)
class WeightsRequest(_Message):
    """Sampler -> learner (DEALER -> ROUTER): "send me the latest weights; I have `have_version`".

    Invariants: `have_version >= -1` (-1: none). The learner answers on the sampler's own topic of the
    weights channel once that subscriber is connected (see sockets.py), and only if it has a newer version.
    """

    TYPE: ClassVar[str] = "WeightsRequest"
    sampler_id: str
    have_version: int

    def validate(self) -> None:
        _check_id(self.sampler_id, "sampler_id")
        _check(self.have_version >= -1, f"have_version must be >= -1, got {self.have_version}")


@dataclass(kw_only=True, eq=False)
class Heartbeat(_Message):
    """Any -> any: liveness. Invariants: `seq >= 0` increases per sender; `time_s` is wall-clock seconds."""

    TYPE: ClassVar[str] = "Heartbeat"
    sender: str
    role: str
    seq: int
    time_s: float

    def validate(self) -> None:
        _check_id(self.sender, "sender")
        _check(self.seq >= 0, f"seq must be >= 0, got {self.seq}")
        _check(math.isfinite(self.time_s), "time_s must be finite")


@dataclass(kw_only=True, eq=False)
class Shutdown(_Message):
    """Any -> any: orderly stop (finish or abort in-flight work, flush, exit). `reason` is for the log."""

    TYPE: ClassVar[str] = "Shutdown"
    sender: str
    reason: str = ""

    def validate(self) -> None:
        _check_id(self.sender, "sender")


MESSAGE_TYPES: dict[str, type[_Message]] = {
    cls.TYPE: cls
    for cls in (WorkRequest, WorkGrant, RolloutGroup, ScoredGroup, WeightUpdate, WeightsRequest, Heartbeat, Shutdown)
}
"""Top-level message types by wire name (PromptGroup and Response only travel inside others)."""

Message = WorkRequest | WorkGrant | RolloutGroup | ScoredGroup | WeightUpdate | WeightsRequest | Heartbeat | Shutdown
