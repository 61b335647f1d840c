"""Sampler service: asks the learner for prompt groups, generates, pushes RolloutGroups to the graders.

    minirl-async sampler -c configs/tiny.toml --index 0

Sockets (proto/sockets.py documents patterns and high-water marks):
- DEALER -> learner ROUTER (`network.work_addr`): WorkRequest (free slots, weight version) -> WorkGrant;
  WeightsRequest at start-up (late join / restart) and until the first weights are in, and again when a
  version's assembly stalls with chunks missing (WEIGHTS_STALL_S).
- SUB <- learner XPUB (`network.weights_addr`): WeightUpdate chunks, assembled by WeightReceiver while
  generation runs (generation is in a worker thread, the event loop keeps receiving).
- PUSH -> graders (`network.rollout_addr`, one per grader): RolloutGroups; blocks when graders lag.
A complete new version is applied between batches (the engine's interruptible mode may apply it between
decode steps itself). If the learner answers with Shutdown(reason="rollback") (it restarted from an
older checkpoint than our weights), the sampler drops its weights and asks for the learner's.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import zmq
import zmq.asyncio
from minirl_async.proto.messages import (
    Message,
    PromptGroup,
    ProtocolError,
    Shutdown,
    WeightsRequest,
    WeightUpdate,
    WorkGrant,
    WorkRequest,
)
from minirl_async.proto.sockets import (
    ChannelStats,
    SocketOptions,
    receive_loop,
    rollout_push,
    send_message,
    weights_sub,
    work_dealer,
)
from minirl_async.proto.weights import WeightReceiver, WeightSet
from minirl_async.services.common import (
    EXIT_RESTART,
    RollbackExit,
    config_of,
    install_stop_handlers,
    mark_ready,
    rollout_addrs,
    set_threads,
    setup_logging,
    status_dir,
    stop_code,
)
from minirl_async.services.compute import make_engine

from minirl_async.config import Config
from minirl_async.engine.base import WeightUpdateError

REQUEST_TIMEOUT_S = 2.0  # re-send a WorkRequest / WeightsRequest that got no answer (learner restarting)
WEIGHTS_STALL_S = 5.0  # a version assembly with no chunk for this long lost chunks: ask for the version again


class SamplerService:
    def __init__(self, cfg: Config, index: int):
        self.cfg, self.index = cfg, index
        self.sampler_id = f"sampler-{index}"
        self.log = setup_logging(self.sampler_id)
        self.engine: Any = None
        self.receiver = WeightReceiver()
        self.pending: WeightSet | None = None  # complete version waiting for a batch boundary
        self.grants: asyncio.Queue[WorkGrant] = asyncio.Queue()
        self.stop = asyncio.Event()
        self.rollback = False
        self.stats = {"work": ChannelStats(), "weights": ChannelStats()}
        self.groups_done = 0
        self.busy_s = 0.0
        self.busy_log: Any = None
        self.generating = False
        self.new_weights = asyncio.Event()
        self.duplicate_chunks = 0
        self.refused_updates = 0  # complete updates the engine refused (bad tensors, format mismatch)
        self.last_chunk_at = 0.0  # monotonic time of the last weight chunk (a stream in progress)
        self.last_weights_request = 0.0  # monotonic time of our last WeightsRequest
        self.weights_rerequests = 0  # WeightsRequests sent because an assembly stalled (chunks lost)

    @property
    def version(self) -> int:
        return int(self.engine.version)

    # ---- incoming -----------------------------------------------------------------------------------
    def on_work(self, msg: Message, _peer: bytes | None) -> None:
        if isinstance(msg, WorkGrant):
            self.grants.put_nowait(msg)
        elif isinstance(msg, Shutdown):
            if msg.reason == "rollback":
                self.rollback = True
            else:
                self.log.info("shutdown from %s: %s", msg.sender, msg.reason)
                self.stop.set()
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} on the work channel")

    def on_weights(self, msg: Message, _peer: bytes | None) -> None:
        if not isinstance(msg, WeightUpdate):
            raise ProtocolError(f"unexpected {msg.TYPE} on the weights channel")
        self.last_chunk_at = time.monotonic()
        if msg.version <= self.receiver.version:
            # The same version can arrive twice (broadcast and, after a WeightsRequest, our personal topic):
            # expected, not an error.
            self.duplicate_chunks += 1
            return
        ws = self.receiver.feed(msg)  # ProtocolError for bad chunks: counted and dropped
        if ws is not None:
            self.pending = ws
            self.new_weights.set()  # a backed-off sampler asks again at once: admission moved with the version
            if self.cfg.sampler.interruptible and self.generating:
                # The engine swaps it in between two decode steps of the running batch (per-token versions).
                asyncio.get_running_loop().create_task(self.apply_pending())

    # ---- main loop ----------------------------------------------------------------------------------
    async def apply_pending(self) -> None:
        ws, self.pending = self.pending, None
        if ws is None or ws.version <= self.version:
            return
        t0 = time.monotonic()
        try:
            await asyncio.to_thread(self.engine.update_weights, ws)
        except WeightUpdateError as e:
            # The engine kept its old weights. Keep serving them: the learner backs this sampler off once
            # they are too old for the staleness bound, so a sampler that cannot take updates idles instead
            # of producing stale work, and the refusal is in the log (and in health()).
            self.refused_updates += 1
            self.log.error("weights v%d refused (%d so far), still serving v%d: %s", ws.version,
                           self.refused_updates, self.version, e)
            return
        self.log.info("applied weights v%d in %.3fs", ws.version, time.monotonic() - t0)

    async def handle_rollback(self, dealer: zmq.asyncio.Socket) -> None:
        self.log.warning("learner rolled back (restart from checkpoint): dropping weights v%d", self.version)
        self.rollback = False
        self.receiver = WeightReceiver()
        self.pending = None
        self.engine.reset()
        await self.request_weights(dealer, -1)

    async def request_weights(self, dealer: zmq.asyncio.Socket, have_version: int) -> None:
        await send_message(dealer, WeightsRequest(sampler_id=self.sampler_id, have_version=have_version))
        self.last_weights_request = time.monotonic()

    async def rerequest_stalled_weights(self, dealer: zmq.asyncio.Socket) -> bool:
        """A version is half assembled and no chunk came for WEIGHTS_STALL_S: its missing chunks are lost (our
        SUB was disconnected, a chunk was dropped as bad) and the learner sends them again only when asked,
        while we would keep serving old weights (with max_staleness = 0 the run stalls). Ask for the version
        again, at most once per WEIGHTS_STALL_S. Returns whether it asked."""
        missing = self.receiver.missing_chunks()
        now = time.monotonic()
        if self.pending is not None or not missing or now - max(self.last_chunk_at, self.last_weights_request) \
                <= WEIGHTS_STALL_S:
            return False
        self.weights_rerequests += 1
        self.log.warning("weights v%s stalled: %d of its chunks missing for %.1fs; asking the learner again "
                         "(still serving v%d; %d such requests so far)", self.receiver.pending_version, len(missing),
                         now - self.last_chunk_at, self.version, self.weights_rerequests)
        await self.request_weights(dealer, self.version)
        return True

    async def next_grant(self, dealer: zmq.asyncio.Socket) -> WorkGrant | None:
        while not self.grants.empty():  # stale grants of timed-out requests are still work
            return self.grants.get_nowait()
        slots = self.cfg.sampler.max_batch_size
        await send_message(dealer, WorkRequest(sampler_id=self.sampler_id, free_slots=slots,
                                               weight_version=self.version))
        try:
            return await asyncio.wait_for(self.grants.get(), REQUEST_TIMEOUT_S)
        except TimeoutError:
            return None

    async def work(self, dealer: zmq.asyncio.Socket, pushes: list[zmq.asyncio.Socket]) -> None:
        push = pushes[0]
        await self.request_weights(dealer, -1)
        while not self.stop.is_set():
            if self.rollback:
                await self.handle_rollback(dealer)
            await self.apply_pending()
            if self.version < 0:
                # Ask again only when nothing is on its way: a request answered by a stream in progress
                # (or a complete version waiting to be applied) would only cost another full stream.
                quiet = time.monotonic() - max(self.last_weights_request, self.last_chunk_at)
                if quiet > REQUEST_TIMEOUT_S and self.pending is None:
                    await self.request_weights(dealer, -1)
                await asyncio.sleep(0.02)
                continue
            await self.rerequest_stalled_weights(dealer)
            grant = await self.next_grant(dealer)
            if grant is None:
                continue
            if grant.backoff_s > 0:
                # Back off, but not past the arrival of a new version: the learner publishes right after
                # the step that opens the admission window, so new weights mean new work is likely.
                self.new_weights.clear()
                try:
                    await asyncio.wait_for(self.new_weights.wait(), min(grant.backoff_s, 1.0))
                except TimeoutError:
                    pass
                continue
            await self.generate(grant.groups, push)

    async def generate(self, groups: list[PromptGroup], push: zmq.asyncio.Socket) -> None:
        t0, w0 = time.monotonic(), time.time()
        self.generating = True
        try:
            rollouts = await asyncio.to_thread(self.engine.generate, groups)
        finally:
            self.generating = False
        self.busy_s += time.monotonic() - t0
        if self.busy_log is not None:  # busy intervals (wall clock) for the overlap bench and the report
            self.busy_log.write(f"{w0:.6f} {time.time():.6f} {len(groups)}\n")
        for r in rollouts:
            r.sampler_id = self.sampler_id
            await send_message(push, r)
        self.groups_done += len(rollouts)
        self.log.debug("pushed %d groups (v%d)", len(rollouts), self.version)

    async def run(self) -> int:
        install_stop_handlers(self.stop)
        set_threads(self.cfg.sampler.threads)
        self.engine = await asyncio.to_thread(make_engine, self.cfg, self.index)
        ctx = zmq.asyncio.Context()
        opts = SocketOptions.from_config(self.cfg.network)
        net = self.cfg.network
        dealer = work_dealer(ctx, net.work_addr, self.sampler_id, opts)
        sub = weights_sub(ctx, net.weights_addr, self.sampler_id, opts)
        push = rollout_push(ctx, rollout_addrs(self.cfg)[0], opts)
        for addr in rollout_addrs(self.cfg)[1:]:
            push.connect(addr)  # one PUSH round-robins over every grader
        tasks = [
            asyncio.create_task(receive_loop(dealer, self.on_work, max_bytes=opts.max_msg_bytes,
                                             stats=self.stats["work"], log=self.log)),
            asyncio.create_task(receive_loop(sub, self.on_weights, envelope="topic", max_bytes=opts.max_msg_bytes,
                                             stats=self.stats["weights"], log=self.log)),
        ]
        self.busy_log = open(status_dir(self.cfg) / f"{self.sampler_id}.busy", "a", buffering=1)
        mark_ready(self.cfg, self.sampler_id)
        worker = asyncio.create_task(self.work(dealer, [push]))
        stopper = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait([worker, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        finally:
            for t in [worker, stopper, *tasks]:
                t.cancel()
            await asyncio.gather(worker, stopper, *tasks, return_exceptions=True)
            for s in (dealer, sub, push):
                s.close(linger=0)
            ctx.term()
            self.busy_log.close()
        self.log.info("stopped after %d groups (busy %.1fs)", self.groups_done, self.busy_s)
        return stop_code()


def main(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    try:
        return asyncio.run(SamplerService(cfg, int(getattr(args, "index", 0))).run())
    except RollbackExit:
        return EXIT_RESTART
