"""Socket helpers: one factory per socket of DESIGN.md's diagram, sending, and a hardened receive loop.

Every socket gets LINGER (close waits at most `linger_ms` for unsent messages, never forever),
MAXMSGSIZE (a peer sending a larger frame is disconnected by zmq; `decode` also refuses larger
messages), high-water marks, ZMTP heartbeats (a dead TCP peer is noticed within ~3 heartbeats; not on the
weights channel, see below) and, when configured, CurveZMQ. Binding sockets are CURVE servers (server secret
key file), connecting sockets are CURVE clients (client secret key file + server public key file); `start_authenticator`
restricts servers to the client public keys in a folder (`network.curve_allowed_clients`; when that is
set, creating a CURVE server socket before `start_authenticator(ctx, folder)` is a ValueError, since
libzmq without an authenticator admits any client that knows the server key). Addresses come from the config and default to
127.0.0.1 (or `ipc://` in the run directory).

| socket | pattern | side | HWM full / no peer |
|---|---|---|---|
| work_router  | ROUTER (bind)  | learner  | ROUTER_MANDATORY: send blocks at HWM, raises EHOSTUNREACH for an unknown peer |
| work_dealer  | DEALER (connect, identity = sampler id) | sampler | send blocks (back-pressure) |
| weights_pub  | XPUB (bind, VERBOSE, NODROP, no heartbeats) | learner | send blocks at `weights_hwm` chunks: weights are never dropped |
| weights_sub  | SUB (connect, no heartbeats) | sampler | subscribes to the broadcast topic and its own topic |
| rollout_push / scored_push | PUSH (connect) | sampler / grader | send blocks: a slow grader/learner slows its producers |
| rollout_pull / scored_pull | PULL (bind)    | grader / learner | fair-queues all producers |

Start-up handshake of the weights channel (no chunk lost to a slow subscriber): a sampler connects its
SUB (subscribing to `BROADCAST_TOPIC` and `personal_topic(sampler_id)`) and sends a WeightsRequest on its
DEALER. The learner's XPUB sees the personal subscription only once that SUB is attached, and only then
(`WeightPublisher.serve_pending`) streams the last version on the personal topic; every later version
reaches it as a broadcast. Subscription-gated, so no message goes to a pipe that does not exist yet.

No ZMTP heartbeats on the weights channel (HEARTBEAT_IVL 0 on XPUB and SUB): a subscriber that is busy (a
sampler applying the previous version) stops reading, its queue fills, and libzmq then reads nothing more
from that connection, PINGs included; PONGs wait behind queued chunks. Either side then times out and
drops the connection with every chunk queued on it (measured: 8 of 20 chunks arrived, the version never
completed; libzmq 4.3.5 can also abort on the reconnect). A dead sampler on this channel is noticed by
TCP instead: keepalive probes (answered by the peer's kernel, however slowly the process reads) when idle,
retransmission timeouts while chunks are unacknowledged.

Receiving is bounded per MESSAGE, not only per frame (MAXMSGSIZE): `recv_bounded` reads part by part and
keeps at most `codec.MAX_FRAMES` frames of at most `max_bytes` in all; the rest of an oversized message is
read and discarded (libzmq itself still buffers a whole message, each part at most MAXMSGSIZE).

    ctx = zmq.asyncio.Context(); opts = SocketOptions.from_config(cfg.network)
    pull = scored_pull(ctx, cfg.network.scored_addr, opts)
    await receive_loop(pull, handle, max_bytes=opts.max_msg_bytes, stats=stats, log=log)
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import zmq
import zmq.asyncio
import zmq.auth
from minirl_async.proto.codec import MAX_FRAMES, decode, encode, short
from minirl_async.proto.messages import Message, ProtocolError, WeightsRequest

if TYPE_CHECKING:  # weights.py needs torch; graders use these sockets without it
    from minirl_async.proto.weights import StateFn, TensorSpec, WeightSender

BROADCAST_TOPIC = b"w:*\x00"
_AUTHENTICATED: dict[int, str] = {}  # libzmq context address -> client key folder its authenticator enforces


def personal_topic(sampler_id: str) -> bytes:
    """Topic of one sampler on the weights channel; never a prefix of another id's or the broadcast's."""
    return b"w:@" + sampler_id.encode() + b"\x00"


@dataclass(frozen=True)
class CurveConfig:
    """CurveZMQ key files (written by `minirl-async keys DIR --name NAME`); empty strings: no CURVE."""

    server_secret_file: str = ""
    """NAME.key_secret of the server pair: needed by every process that binds."""
    client_secret_file: str = ""
    """NAME.key_secret of this client's pair: needed by every process that connects."""
    server_public_file: str = ""
    """NAME.key of the server pair: clients verify the server with it."""
    allowed_clients_dir: str = ""
    """Folder of the NAME.key files of clients a server accepts (see start_authenticator)."""


@dataclass(frozen=True)
class SocketOptions:
    """Transport settings shared by all factories (build them with `from_config(cfg.network)`)."""

    hwm: int = 1000
    weights_hwm: int = 8
    max_msg_bytes: int = 1 << 30
    linger_ms: int = 1000
    heartbeat_s: float = 2.0
    curve: CurveConfig = field(default_factory=CurveConfig)

    @classmethod
    def from_config(cls, net: Any) -> SocketOptions:
        return cls(hwm=net.hwm, weights_hwm=net.weights_hwm, max_msg_bytes=net.max_msg_bytes,
                   heartbeat_s=net.heartbeat_s,
                   curve=CurveConfig(net.curve_server_key, net.curve_client_key, net.curve_server_public,
                                     net.curve_allowed_clients))


def _load_keys(path: str, what: str) -> tuple[bytes, bytes | None]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read the CurveZMQ {what} {path!r} ({e}); write one with `minirl-async keys DIR`") from None
    return public, secret


def _configure(sock: zmq.Socket, opts: SocketOptions, server: bool) -> None:
    sock.setsockopt(zmq.LINGER, opts.linger_ms)
    sock.setsockopt(zmq.MAXMSGSIZE, opts.max_msg_bytes)
    sock.setsockopt(zmq.SNDHWM, opts.hwm)
    sock.setsockopt(zmq.RCVHWM, opts.hwm)
    if sock.type in (zmq.XPUB, zmq.SUB):  # weights channel: no heartbeats (module docstring)
        sock.setsockopt(zmq.HEARTBEAT_IVL, 0)
        sock.setsockopt(zmq.TCP_KEEPALIVE, 1)
        sock.setsockopt(zmq.TCP_KEEPALIVE_IDLE, max(1, round(3 * opts.heartbeat_s)))
        sock.setsockopt(zmq.TCP_KEEPALIVE_INTVL, max(1, round(opts.heartbeat_s)))
        sock.setsockopt(zmq.TCP_KEEPALIVE_CNT, 3)
    else:
        ivl = max(1, int(opts.heartbeat_s * 1000))
        sock.setsockopt(zmq.HEARTBEAT_IVL, ivl)
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * ivl)
    c = opts.curve
    if server and c.server_secret_file:
        public, secret = _load_keys(c.server_secret_file, "server secret key")
        if secret is None:
            raise ValueError(f"{c.server_secret_file} holds no secret key; pass the NAME.key_secret file")
        sock.curve_publickey, sock.curve_secretkey = public, secret
        sock.curve_server = True
        if c.allowed_clients_dir and _AUTHENTICATED.get(sock.context.underlying) != c.allowed_clients_dir:
            # Without a running ZAP authenticator libzmq admits every client that knows the server key.
            raise ValueError(f"network.curve_allowed_clients is {c.allowed_clients_dir!r}: call "
                             "start_authenticator(ctx, that folder) before creating CURVE server sockets")
    elif not server and (c.client_secret_file or c.server_public_file):
        if not (c.client_secret_file and c.server_public_file):
            raise ValueError("a CURVE client needs both network.curve_client_key and network.curve_server_public")
        public, secret = _load_keys(c.client_secret_file, "client secret key")
        if secret is None:
            raise ValueError(f"{c.client_secret_file} holds no secret key; pass the NAME.key_secret file")
        server_public, _ = _load_keys(c.server_public_file, "server public key")
        sock.curve_publickey, sock.curve_secretkey, sock.curve_serverkey = public, secret, server_public


def _make(ctx: zmq.Context, kind: int, addr: str, opts: SocketOptions, bind: bool,
          identity: bytes | None = None) -> zmq.Socket:
    sock = ctx.socket(kind)
    try:
        _configure(sock, opts, server=bind)
        if identity is not None:
            sock.setsockopt(zmq.ROUTING_ID, identity)
        if kind == zmq.XPUB:
            sock.setsockopt(zmq.SNDHWM, opts.weights_hwm)
            sock.setsockopt(zmq.XPUB_VERBOSE, 1)  # pass every subscription: each is a "subscriber ready"
            sock.setsockopt(zmq.XPUB_NODROP, 1)  # block at HWM instead of silently dropping chunks
        if kind == zmq.SUB:
            sock.setsockopt(zmq.RCVHWM, opts.weights_hwm)
        if kind == zmq.ROUTER:
            sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        sock.bind(addr) if bind else sock.connect(addr)
    except BaseException:
        sock.close(0)
        raise
    return sock


def work_router(ctx: zmq.Context, addr: str, opts: SocketOptions) -> zmq.Socket:
    """Learner ROUTER (bind): WorkRequest, WeightsRequest, Heartbeat in; WorkGrant out. Frames: [id, ...]."""
    return _make(ctx, zmq.ROUTER, addr, opts, bind=True)


def work_dealer(ctx: zmq.Context, addr: str, sampler_id: str, opts: SocketOptions) -> zmq.Socket:
    """Sampler DEALER (connect) with routing id = sampler id, so the learner can address it by name."""
    return _make(ctx, zmq.DEALER, addr, opts, bind=False, identity=sampler_id.encode())


def weights_pub(ctx: zmq.Context, addr: str, opts: SocketOptions) -> zmq.Socket:
    """Learner XPUB (bind): WeightUpdate chunks as [topic, frames...]; receives subscription events."""
    return _make(ctx, zmq.XPUB, addr, opts, bind=True)


def weights_sub(ctx: zmq.Context, addr: str, sampler_id: str, opts: SocketOptions) -> zmq.Socket:
    """Sampler SUB (connect) on the broadcast topic and its personal topic (see the handshake above)."""
    sock = _make(ctx, zmq.SUB, addr, opts, bind=False)
    sock.setsockopt(zmq.SUBSCRIBE, BROADCAST_TOPIC)
    sock.setsockopt(zmq.SUBSCRIBE, personal_topic(sampler_id))
    return sock


def rollout_push(ctx: zmq.Context, addr: str, opts: SocketOptions, bind: bool = False) -> zmq.Socket:
    """Sampler PUSH of RolloutGroups (blocks when graders fall behind)."""
    return _make(ctx, zmq.PUSH, addr, opts, bind=bind)


def rollout_pull(ctx: zmq.Context, addr: str, opts: SocketOptions, bind: bool = True) -> zmq.Socket:
    """Grader PULL of RolloutGroups. One binder per address: with several graders, bind the samplers'
    side instead (or run a PULL->PUSH `zmq.proxy`) and connect every grader."""
    return _make(ctx, zmq.PULL, addr, opts, bind=bind)


def scored_push(ctx: zmq.Context, addr: str, opts: SocketOptions, bind: bool = False) -> zmq.Socket:
    """Grader PUSH of ScoredGroups (blocks when the learner's buffer is full: back-pressure)."""
    return _make(ctx, zmq.PUSH, addr, opts, bind=bind)


def scored_pull(ctx: zmq.Context, addr: str, opts: SocketOptions, bind: bool = True) -> zmq.Socket:
    """Learner PULL of ScoredGroups from all graders."""
    return _make(ctx, zmq.PULL, addr, opts, bind=bind)


def start_authenticator(ctx: zmq.Context, allowed_clients_dir: str | None = None) -> Any:
    """Start a ZAP authenticator for CURVE servers of `ctx`: only client public keys found in
    `allowed_clients_dir` (NAME.key files) may connect; None allows any client holding the server key.
    Returns the authenticator; call `.stop()` on shutdown (before terminating the context)."""
    if allowed_clients_dir and not os.path.isdir(allowed_clients_dir):
        raise ValueError(f"network.curve_allowed_clients {allowed_clients_dir!r} is not a folder of NAME.key files")
    if isinstance(ctx, zmq.asyncio.Context):
        from zmq.auth.asyncio import AsyncioAuthenticator

        auth: Any = AsyncioAuthenticator(ctx)
    else:
        from zmq.auth.thread import ThreadAuthenticator

        auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=allowed_clients_dir or zmq.auth.CURVE_ALLOW_ANY)
    _AUTHENTICATED[ctx.underlying] = allowed_clients_dir or ""
    return auth


# ---------------------------------------------------------------- sending and receiving
def send_message(sock: zmq.Socket, msg: Message, *, identity: bytes | None = None,
                 topic: bytes | None = None) -> Any:
    """Encode and send (zero-copy). Returns what send_multipart returns (await it on asyncio sockets). To know
    when zmq no longer reads the frames' memory, send `tracked_frames(...)` instead (pyzmq's `track=True`
    tracks only the last frame)."""
    frames = encode(msg)
    if topic is not None:
        frames.insert(0, topic)
    if identity is not None:
        frames.insert(0, identity)
    return sock.send_multipart(frames, copy=False)


def tracked_frames(frames: list[Any], copy_threshold: int = zmq.COPY_THRESHOLD
                   ) -> tuple[list[Any], list[zmq.MessageTracker]]:
    """`frames` to send with copy=False, each that zmq would NOT copy (>= `copy_threshold` bytes: pyzmq copies
    smaller ones at send) wrapped as a tracked `zmq.Frame`, and the trackers of all of them: zmq no longer
    reads any frame's memory once every tracker is `done`. Needed because `send_multipart(track=True)` returns
    the LAST frame's tracker only, already done when that frame was small enough to be copied. Drop the
    returned frames after sending: a tracker is done only once its Frame object is gone too."""
    out: list[Any] = []
    trackers: list[zmq.MessageTracker] = []
    for f in frames:
        if not isinstance(f, zmq.Frame) and memoryview(f).nbytes >= copy_threshold:
            f = zmq.Frame(f, copy=False, track=True)
            trackers.append(f.tracker)
        out.append(f)
    return out, trackers


@dataclass
class ChannelStats:
    """What a receive loop saw; services export these as metrics."""

    received: int = 0
    errors: int = 0
    last_error: str = ""
    by_type: dict[str, int] = field(default_factory=dict)


Handler = Callable[[Message, bytes | None], Awaitable[None] | None]


async def receive_loop(sock: zmq.asyncio.Socket, handle: Handler, *, envelope: Literal["none", "identity", "topic"] = "none",
                       max_bytes: int = 1 << 30, stats: ChannelStats | None = None,
                       log: logging.Logger | None = None) -> None:
    """Receive, decode and hand each message to `handle(msg, peer)` (peer: ROUTER identity or topic, else
    None) forever; cancel the task to stop. Messages are read with `recv_bounded` (at most `max_bytes` and
    `codec.MAX_FRAMES` frames besides the envelope). A ProtocolError from receiving, decoding or the handler is
    logged, counted (message cut to `codec.MAX_ERROR_CHARS`) and the message dropped; any other exception is a
    bug and propagates."""
    stats = stats if stats is not None else ChannelStats()
    log = log or logging.getLogger("minirl_async.proto")
    extra = 0 if envelope == "none" else 1
    while True:
        try:
            frames = await recv_bounded(sock, max_bytes=max_bytes, max_frames=MAX_FRAMES + extra, skip=extra)
            peer = None
            if envelope != "none":
                if len(frames) < 2:
                    raise ProtocolError(f"message without its {envelope} frame")
                peer, frames = frames[0].bytes, frames[1:]
            msg = decode(frames, max_bytes=max_bytes)
            stats.received += 1
            stats.by_type[msg.TYPE] = stats.by_type.get(msg.TYPE, 0) + 1
            result = handle(msg, peer)
            if inspect.isawaitable(result):
                await result
        except ProtocolError as e:
            stats.errors += 1
            stats.last_error = short(str(e))
            log.warning("dropped a bad message (%d so far): %s", stats.errors, stats.last_error)


async def recv_bounded(sock: zmq.asyncio.Socket, *, max_bytes: int, max_frames: int = MAX_FRAMES,
                       skip: int = 0) -> list[zmq.Frame]:
    """One whole multipart message, read part by part (`recv_multipart` would wrap every part first).
    Keeps at most `max_frames` frames whose sizes, the first `skip` (envelope) frames aside, add up to at most
    `max_bytes`; past either limit it reads the rest of the message without keeping it and raises
    ProtocolError, so the next call starts at the next message and what Python holds of an oversized one
    stays within the limits. (libzmq makes a message readable only once all its parts have arrived, and
    MAXMSGSIZE bounds each part, not their number: libzmq's own buffer of one message is not bounded here.)"""
    frames: list[zmq.Frame] = []
    total, parts, over = 0, 0, ""
    f = await sock.recv(copy=False)
    rest: zmq.Socket = zmq.Socket.shadow(sock.underlying)  # the other parts are queued already: read them directly
    while True:
        parts += 1
        if not over:
            total += len(f) if parts > skip else 0
            if parts > max_frames:
                over = f"{max_frames} frames"
            elif total > max_bytes:
                over = f"{max_bytes} bytes (max_msg_bytes)"
            else:
                frames.append(f)
        if not f.more:
            break
        f = rest.recv(zmq.NOBLOCK, copy=False)
    if over:
        frames.clear()
        raise ProtocolError(f"message exceeds the limit of {over}; dropped its {parts} frames")
    return frames


# ---------------------------------------------------------------- learner side of the weights channel
def parse_subscription(frame: Any) -> tuple[bool, bytes]:
    """An XPUB event frame -> (subscribed?, topic)."""
    data = frame.bytes if hasattr(frame, "bytes") else bytes(frame)
    if not data or data[0] not in (0, 1):
        raise ProtocolError("not an XPUB subscription event")
    return data[0] == 1, data[1:]


class WeightPublisher:
    """Broadcasts versions on an XPUB socket and serves WeightsRequests once the requester is subscribed.

    One stream at a time (a lock): a broadcast and a late joiner's personal stream never interleave, and
    concurrent callers of `serve_pending` cannot serve (or forget) the same request twice. Sends wait at the
    high-water mark instead of failing: an XPUB always polls writable, so with XPUB_NODROP a full pipe
    surfaces as `zmq.Again` from an asyncio send; `send` retries it with a short back-off (a slow sampler
    slows the stream; it never loses chunks nor crashes the learner).

    With `sender.keep_blobs=False` a late joiner is served by re-serialising the live weights, which must
    still BE the last published version: before a step changes them the learner calls `hold_weights()`
    (which waits for a stream in progress to end), and clears `hold` once the new version is published;
    nothing is served meanwhile (requests stay pending). With
    `keep_blobs=True` it is served as soon as the subscription arrives.

    Zero copy: without kept blobs, chunks may VIEW the live weights (`WeightSender.views_live`: tensors sent in
    the dtype they are kept in), and zmq may still be reading them after `send` returns (queued for a slow
    subscriber). Every frame of those sends that zmq does not copy is tracked (`tracked_frames`: pyzmq's own
    tracker covers the last frame only), and `hold_weights()` also waits until zmq has released every such
    frame, so a step never changes weights that are still going out.
    """

    def __init__(self, sock: zmq.asyncio.Socket, sender: WeightSender, log: logging.Logger | None = None):
        self.sock, self.sender = sock, sender
        self.log = log or logging.getLogger("minirl_async.proto")
        self.subscribed: set[bytes] = set()  # personal topics whose SUB is attached
        self.pending: dict[str, int] = {}  # sampler id -> have_version
        self.resent = 0
        self.hold = False  # the live weights are ahead of the last published version (see above)
        self.full_waits = 0  # sends that found a subscriber's pipe full and waited
        self._lock = asyncio.Lock()
        self._in_flight: list[zmq.MessageTracker] = []  # sends whose frames may view the live weights

    async def hold_weights(self) -> None:
        """Set `hold` once no stream is going out and zmq has let go of every frame viewing the live weights."""
        async with self._lock:
            self.hold = True
            delay = 0.0005
            while self._in_flight:
                self._in_flight = [t for t in self._in_flight if not t.done]
                if self._in_flight:
                    await asyncio.sleep(delay)
                    delay = min(2 * delay, 0.02)

    async def send(self, msg: Message, topic: bytes) -> None:
        """Send one chunk, waiting (not failing) while a subscriber's pipe is at its high-water mark."""
        delay = 0.001
        frames: list[Any] = [topic, *encode(msg)]
        trackers: list[zmq.MessageTracker] = []
        if self.sender.views_live:  # this chunk (the sender's last) views the live weights: track every frame
            frames, trackers = tracked_frames(frames, getattr(self.sock, "copy_threshold", zmq.COPY_THRESHOLD))
        while True:
            try:
                await self.sock.send_multipart(frames, copy=False)
                if trackers:
                    self._in_flight = [t for t in self._in_flight if not t.done] + trackers
                return
            except zmq.Again:
                self.full_waits += 1
                await asyncio.sleep(delay)
                delay = min(2 * delay, 0.05)

    async def publish(self, version: int, state_fn: StateFn, specs: list[TensorSpec] | None = None, *,
                      in_thread: bool = False) -> int:
        """Broadcast every chunk of `version`; returns the number of chunks. `in_thread`: serialise each
        chunk in a worker thread, so the event loop keeps serving while the state is walked."""
        n = 0
        async with self._lock:
            chunks = self.sender.publish(version, state_fn, specs)
            while True:
                msg = await asyncio.to_thread(next, chunks, None) if in_thread else next(chunks, None)
                if msg is None:
                    return n
                await self.send(msg, BROADCAST_TOPIC)
                n += 1

    def on_request(self, req: WeightsRequest) -> None:
        self.pending[req.sampler_id] = req.have_version

    def on_subscription(self, frame: Any) -> None:
        subscribed, topic = parse_subscription(frame)
        if topic == BROADCAST_TOPIC:
            return
        (self.subscribed.add if subscribed else self.subscribed.discard)(topic)

    async def serve_pending(self) -> int:
        """Stream the last version to every pending requester that is subscribed and behind; returns how many.
        Nothing is served while another stream (a publish or a resend) is going out, nor while the live
        weights are ahead of the last published version (`hold`) without kept blobs: the requests stay
        pending for the next call."""
        if self._lock.locked():   # a stream is going out: callers must not queue up behind it
            return 0
        served = 0
        async with self._lock:
            for sampler_id in list(self.pending):
                if self.sender.publishing or (self.hold and not self.sender.keep_blobs):
                    break
                topic = personal_topic(sampler_id)
                if topic not in self.subscribed:
                    continue
                have = self.pending.pop(sampler_id)
                if self.sender.last_version <= have:
                    continue
                chunks = self.sender.resend()
                while (msg := await asyncio.to_thread(next, chunks, None)) is not None:
                    await self.send(msg, topic)
                served += 1
                self.resent += 1
        return served

    async def run_subscriptions(self) -> None:
        """Track XPUB subscription events forever (cancel to stop); serves at once with kept blobs."""
        while True:
            frame = await self.sock.recv(copy=False)
            try:
                self.on_subscription(frame)
            except ProtocolError as e:
                self.log.warning("weights channel: %s", e)
                continue
            if self.sender.keep_blobs and self.pending:
                await self.serve_pending()
