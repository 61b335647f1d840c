"""Learner service: rank 0 is the hub (controller, staleness tracker, sockets), every rank trains.

    minirl-async learner -c configs/tiny.toml                         # one rank
    torchrun --nproc-per-node 2 -m minirl_async.cli learner -c ...    # FSDP2 ranks; only rank 0 talks ZeroMQ

Sockets of rank 0 (proto/sockets.py documents patterns and high-water marks):
- ROUTER `network.work_addr`: WorkRequest -> WorkGrant (groups under the admission bound, or a back-off);
  WeightsRequest (late join / restart: the sampler's leases are released, the last version is streamed
  on its personal topic between steps); Heartbeat.
- XPUB `network.weights_addr`: every version as WeightUpdate chunks (FP8 where the sampler is FP8).
- PULL `network.scored_addr`: ScoredGroups -> controller (dedup, guard, ledger).
The train step runs in a worker thread, so the event loop keeps granting work and receiving groups while
it trains. Per step: take a batch of whole groups -> choose the replay mode (staleness tracker) -> train
(N minibatch updates) -> version += 1 -> publish -> metrics.jsonl line (ALGORITHM.md section 7 names)
-> checkpoint (controller state in its extra slot). events.log gets one line per event that matters
(start, resume, step with the trained group ids, replay-mode changes, checkpoints, stop).
Minibatch k of a step holds groups [k * minibatch_groups, (k + 1) * minibatch_groups) of the batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import time
from pathlib import Path
from typing import Any

import zmq
import zmq.asyncio
from minirl_async.proto.messages import (
    Heartbeat,
    Message,
    PromptGroup,
    ProtocolError,
    ScoredGroup,
    Shutdown,
    WeightsRequest,
    WorkGrant,
    WorkRequest,
)
from minirl_async.proto.sockets import (
    ChannelStats,
    SocketOptions,
    WeightPublisher,
    receive_loop,
    scored_pull,
    send_message,
    weights_pub,
    work_router,
)
from minirl_async.proto.weights import WeightSender
from minirl_async.services.common import (
    STOP_SIGNAL,
    config_of,
    install_stop_handlers,
    mark_ready,
    sanity_errors,
    set_threads,
    setup_logging,
    start_curve_auth,
)
from minirl_async.services.compute import make_trainer

from minirl_async.config import Config, ConfigError
from minirl_async.controller import Controller
from minirl_async.staleness import StalenessTracker, lag_metrics
from minirl_async.tasks.source import make_prompt_source

BACKOFF_S = 0.05
BEHIND_RESEND_S = 30.0  # a sampler reporting an older version than the last published one for this long is
                        # sent the last version point to point (it lost every chunk of the stream)


def reward_metrics(groups: list[ScoredGroup]) -> dict[str, float]:
    rewards = [[float(x) for x in g.rewards] for g in groups]
    flat = [x for r in rewards for x in r]
    return {
        "reward/mean": statistics.fmean(flat),
        "reward/acc": statistics.fmean(float(x >= 1.0) for x in flat),
        "reward/std_in_group": statistics.fmean(statistics.pstdev(r) for r in rewards),
        "reward/zero_adv_groups": statistics.fmean(float(max(r) == min(r)) for r in rewards),
    }


def oldest_version(g: ScoredGroup, current: int) -> int:
    v = g.min_version
    return current if v < 0 else v  # a group without any token cannot be stale


class RunLog:
    """metrics.jsonl (one JSON object per step, flushed) and events.log (one line per event)."""

    def __init__(self, run_dir: Path):
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.is_file():   # a crash mid-write left a torn last line: cut it, or our first row would join it
            data = path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self.metrics = open(path, "a", buffering=1)
        self.events = open(run_dir / "events.log", "a", buffering=1)

    def event(self, text: str) -> None:
        self.events.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {text}\n")

    def step(self, row: dict[str, Any]) -> None:
        self.metrics.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self.metrics.close()
        self.events.close()


def set_aside_earlier_run(run_dir: Path) -> list[Path]:
    """A fresh start (learner.resume = false) in a run directory an earlier run used: move its checkpoints
    and metrics to `<name>.before-<time>` instead of mixing two runs (a later resume would pick the wrong
    checkpoint, the report would plot both). Returns the new paths."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for path in (run_dir / "checkpoints", run_dir / "metrics.jsonl"):
        if path.is_file() or (path.is_dir() and any(path.iterdir())):
            aside = path.with_name(f"{path.name}.before-{stamp}")
            path.rename(aside)
            moved.append(aside)
    return moved


class LearnerHub:
    def __init__(self, cfg: Config, dist: Any = None):
        self.cfg, self.dist = cfg, dist
        self.run_dir = Path(cfg.run.dir)
        self.log = setup_logging("learner")
        self.stop = asyncio.Event()
        self.batch_event = asyncio.Event()
        self.trainer: Any = None
        self.tok: Any = None
        self.tracker = StalenessTracker(cfg.staleness, cfg.num_minibatches)
        self.controller = Controller(make_prompt_source(cfg, "train"), self.tracker,
                                     cfg.learner.groups_per_step, cfg.staleness.lease_s)
        self.stats = {"work": ChannelStats(), "scored": ChannelStats()}
        self.peers: set[bytes] = set()
        self._serving: asyncio.Task[int] | None = None   # the task streaming weights to late joiners
        self._behind_since: dict[str, float] = {}   # sampler id -> when it first reported a stale version
        self.last_step_end = time.monotonic()
        self.busy_s = 0.0
        self.invalid_reasons: dict[str, int] = {}   # groups refused on arrival, by kind of reason
        moved = [] if cfg.learner.resume else set_aside_earlier_run(self.run_dir)
        self.runlog = RunLog(self.run_dir)
        for path in moved:
            self.runlog.event(f"learner.resume = false: earlier run's {path.name.split('.before-')[0]} moved to {path}")
            self.log.warning("learner.resume = false: moved %s aside", path)

    # ---- multi-rank: rank 0 tells the others what to do (they hold shards; collectives need them all)
    def _command(self, cmd: dict[str, Any]) -> None:
        if self.dist is not None:
            self.dist.broadcast_object_list([cmd], src=0)

    def _train(self, groups: list[ScoredGroup], mode: int, version: int) -> dict[str, Any]:
        self._command({"op": "step", "groups": groups, "mode": mode, "version": version})
        return dict(self.trainer.step(groups, mode, version))

    # ---- router --------------------------------------------------------------------------------------
    async def on_work(self, router: zmq.asyncio.Socket, publisher: WeightPublisher, msg: Message,
                      peer: bytes | None) -> None:
        assert peer is not None
        self.peers.add(peer)
        if isinstance(msg, WorkRequest):
            self._resend_if_left_behind(publisher, msg)
            await self.grant(router, msg, peer)
        elif isinstance(msg, WeightsRequest):
            if msg.have_version < 0:  # a fresh sampler process holds nothing it was leased
                n = self.controller.release_holder(msg.sampler_id)
                if n:
                    self.runlog.event(f"released {n} groups of restarted {msg.sampler_id}")
            publisher.on_request(msg)
            self._serve_soon(publisher)
        elif isinstance(msg, Heartbeat):
            pass
        else:
            raise ProtocolError(f"unexpected {msg.TYPE} on the work channel")

    def _resend_if_left_behind(self, publisher: WeightPublisher, req: WorkRequest) -> None:
        """A sampler whose WorkRequests report an older version than the last published one for
        BEHIND_RESEND_S lost that version's stream entirely (its own stall check needs at least one chunk
        to notice): stream it the last version as if it had asked (WeightsRequest)."""
        latest, now = publisher.sender.last_version, time.monotonic()
        if req.weight_version < 0 or req.weight_version >= latest:
            self._behind_since.pop(req.sampler_id, None)
            return
        since = self._behind_since.setdefault(req.sampler_id, now)
        if now - since >= BEHIND_RESEND_S:
            self._behind_since[req.sampler_id] = now   # at most one resend per BEHIND_RESEND_S
            self.log.warning("%s has reported v%d for %.0fs while v%d is out: streaming it v%d", req.sampler_id,
                             req.weight_version, now - since, latest, latest)
            self.runlog.event(f"resend v{latest} to {req.sampler_id} (it reports v{req.weight_version})")
            publisher.on_request(WeightsRequest(sampler_id=req.sampler_id, have_version=req.weight_version))
            self._serve_soon(publisher)

    def _serve_soon(self, publisher: WeightPublisher) -> None:
        """Serve pending WeightsRequests in a task of its own: a full weight stream must not hold up the
        router's receive loop (WorkRequests keep being answered meanwhile)."""
        if self._serving is not None and not self._serving.done():
            return   # that task serves what is pending; later requests are served by the next call

        def done(task: asyncio.Task[int]) -> None:
            if not task.cancelled() and task.exception() is not None:
                self.log.error("serving late joiners failed: %r", task.exception())

        self._serving = asyncio.create_task(publisher.serve_pending())
        self._serving.add_done_callback(done)

    async def grant(self, router: zmq.asyncio.Socket, req: WorkRequest, peer: bytes) -> None:
        ctl, g = self.controller, self.cfg.algo.group_size
        if req.weight_version > ctl.version:
            # The sampler holds weights newer than ours: we restarted from an older checkpoint.
            await self._send(router, Shutdown(sender="learner", reason="rollback"), peer)
            return
        tickets = ctl.grant(req.sampler_id, req.free_slots // g, req.weight_version) if ctl.version < \
            self.cfg.learner.num_steps else []
        if not tickets:
            await self._send(router, WorkGrant(backoff_s=BACKOFF_S), peer)
            return
        groups = [PromptGroup(group_id=t.group_id, attempt=t.attempt, prompt_ids=self.tok.encode_prompt(t.prompt),
                              meta=dict(t.prompt.meta), group_size=g) for t in tickets]
        if not await self._send(router, WorkGrant(groups=groups), peer):
            ctl.release_holder(req.sampler_id)

    async def _send(self, router: zmq.asyncio.Socket, msg: Message, peer: bytes) -> bool:
        try:
            await send_message(router, msg, identity=peer)
            return True
        except zmq.ZMQError as e:  # EHOSTUNREACH: that sampler is gone
            self.log.warning("cannot reach %r: %s", peer, e)
            return False

    # ---- scored groups -------------------------------------------------------------------------------
    def on_scored(self, msg: Message, _peer: bytes | None) -> None:
        if not isinstance(msg, ScoredGroup):
            raise ProtocolError(f"unexpected {msg.TYPE} on the scored channel")
        v = self.controller.version
        # A group the trainer would refuse (an engine abort, an empty response, token ids outside the vocab,
        # expert ids outside the model...) must never reach a batch: train_step would raise and end the
        # learner, and the re-issued group would end the restarted one too. The prompt goes back to the
        # queue, and is discarded after a few such returns.
        reason = self.invalid_reason(msg)
        outcome = self.controller.accept(msg.group_id, msg.attempt, oldest_version(msg, v), msg,
                                         grader_failed=bool(msg.grader_info.get("dropped")),
                                         newest_version=msg.max_version, invalid=reason is not None)
        if reason is not None and outcome in ("invalid", "discarded"):
            kind = reason.split(":", 1)[0]
            self.invalid_reasons[kind] = self.invalid_reasons.get(kind, 0) + 1
            self.log.warning("group %s attempt %d refused (%s; %d %r so far): %s", msg.group_id, msg.attempt,
                             outcome, self.invalid_reasons[kind], kind, reason)
            self.runlog.event(f"group {msg.group_id} attempt {msg.attempt} {outcome}: {reason}")
        elif outcome != "accepted":
            self.log.info("group %s attempt %d: %s", msg.group_id, msg.attempt, outcome)
        self.batch_event.set()

    def invalid_reason(self, msg: ScoredGroup) -> str | None:
        """Why the group cannot be trained on ('<kind>: <detail>'), or None. The trainer's own checks
        (`invalid_groups`, against the model's vocab and experts) run when it has them: the fake has none."""
        if msg.group_size != self.cfg.algo.group_size:
            return f"group size: {msg.group_size} responses, algo.group_size is {self.cfg.algo.group_size}"
        for i, r in enumerate(msg.responses):
            if r.finish_reason == "abort":
                return f"engine abort: response {i}"
            if r.length == 0:
                return f"empty response: response {i}"
        check = getattr(self.trainer, "invalid_groups", None)
        if check is None:
            return None
        try:
            bad = check([msg])
        except Exception as e:  # a group the checks cannot even read would fail the train step as well
            return f"unreadable: {e!r}"
        return f"refused by the trainer: {bad[msg.group_id]}" if msg.group_id in bad else None

    async def lease_loop(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.cfg.staleness.lease_s / 4))
            n = self.controller.expire_leases()
            if n:
                self.runlog.event(f"lease expired for {n} groups (re-issued)")

    # ---- training ------------------------------------------------------------------------------------
    async def publish(self, publisher: WeightPublisher, version: int) -> float:
        t0 = time.monotonic()
        # Without specs the sender walks the state twice (plan, then serialise): the other ranks must walk it
        # as often, since every walk gathers shards collectively.
        self._command({"op": "publish", "version": version, "passes": 2})
        # chunk by chunk off the event loop, each sent as soon as it is ready
        await publisher.publish(version, self.trainer.state_fn, in_thread=True)
        publisher.hold = False   # the live weights are the published version again: late joiners may be served
        await publisher.serve_pending()
        return time.monotonic() - t0

    async def next_batch(self, publisher: WeightPublisher) -> list[tuple[str, ScoredGroup]]:
        while True:
            batch = self.controller.take_batch()
            if batch is not None:
                return batch
            await publisher.serve_pending()
            self.batch_event.clear()
            try:
                await asyncio.wait_for(self.batch_event.wait(), 0.5)
            except TimeoutError:
                pass

    async def train_loop(self, publisher: WeightPublisher) -> None:
        cfg, ctl = self.cfg, self.controller
        mb, n = cfg.learner.minibatch_groups, cfg.num_minibatches
        while ctl.version < cfg.learner.num_steps:
            batch = await self.next_batch(publisher)
            t_start, wall_start = time.monotonic(), time.time()
            v = ctl.version
            groups = [g for _, g in batch]
            routes = all(r.routes is not None for g in groups for r in g.responses)
            decision = self.tracker.choose_mode(v, [oldest_version(g, v) for g in groups], routes_available=routes)
            per_mb = [[oldest_version_of_response(r, v) for g in groups[k * mb:(k + 1) * mb] for r in g.responses]
                      for k in range(n)]
            await publisher.hold_weights()   # until the new version is out, the live weights are not the published ones
            tm = await asyncio.to_thread(self._train, groups, decision.mode, v)
            train_s = time.monotonic() - t_start
            self.busy_s += train_s
            ctl.finish_step()
            sync_s = await self.publish(publisher, ctl.version)
            now = time.monotonic()
            step_s, self.last_step_end = now - self.last_step_end, now
            resp_tok = sum(g.num_response_tokens for g in groups)
            all_tok = resp_tok + sum(int(g.prompt_ids.shape[0]) * g.group_size for g in groups)
            row: dict[str, Any] = {"step": v, "version": ctl.version, "time": time.time(),
                                   "time_train_start": wall_start, "time_train_end": wall_start + train_s}
            row.update(reward_metrics(groups))
            row.update(tm)
            row.update(lag_metrics(v, per_mb, n))
            row.update(decision.metrics())
            row.update(ctl.metrics())
            row.setdefault("perf/train_tok_s", all_tok / max(train_s, 1e-9))  # the trainer's figure if it gave one
            row.update({"perf/step_s": step_s, "perf/sample_tok_s": resp_tok / max(step_s, 1e-9),
                        "perf/weight_sync_s": sync_s,
                        "perf/train_s": train_s, "perf/learner_busy_s": self.busy_s,
                        "pipeline/bad_messages": sum(s.errors for s in self.stats.values())})
            self.tracker.prev_kl_k3 = tm.get("kl/train_infer_k3")   # saved with the controller state
            self.runlog.step(row)
            self.runlog.event(f"step {v} trained {','.join(gid for gid, _ in batch)} "
                              f"{decision.describe()} lag_max={row['staleness/lag_updates_max']}")
            every = cfg.learner.checkpoint_every
            if ctl.version == cfg.learner.num_steps or (every and ctl.version % every == 0):
                await self.checkpoint()
        self.runlog.event(f"done: {ctl.version} steps")

    async def checkpoint(self) -> None:
        extra = {"controller": self.controller.state_dict()}
        self._command({"op": "save", "step": self.controller.version, "extra": extra})
        path = await asyncio.to_thread(self.trainer.save_checkpoint, self.controller.version, extra)
        self.runlog.event(f"checkpoint {path} at version {self.controller.version}")

    def resume(self) -> None:
        if not self.cfg.learner.resume:
            return
        self._command({"op": "load"})
        extra = self.trainer.load_latest()
        if extra is None:
            return
        self.controller.load_state_dict(extra["controller"])
        self.runlog.event(f"resumed at version {self.controller.version} "
                          f"({self.controller.metrics()['pipeline/in_flight']} groups in flight)")

    # ---- main ----------------------------------------------------------------------------------------
    async def run(self) -> int:
        cfg, net = self.cfg, self.cfg.network
        install_stop_handlers(self.stop)
        set_threads(cfg.learner.threads)
        from minirl_async.tasks.tokenizer import load_tokenizer

        self.tok = load_tokenizer(cfg, cfg.run.sft_checkpoint or None)
        self.trainer = await asyncio.to_thread(make_trainer, cfg, self.run_dir)
        self.resume()
        self.runlog.event(f"learner start pid={os.getpid()} version={self.controller.version} "
                          f"eta={cfg.staleness.max_staleness} N={cfg.num_minibatches}")
        ctx = zmq.asyncio.Context()
        auth = start_curve_auth(ctx, self.cfg.network)
        opts = SocketOptions.from_config(net)
        router = work_router(ctx, net.work_addr, opts)
        pub = weights_pub(ctx, net.weights_addr, opts)
        pull = scored_pull(ctx, net.scored_addr, opts)
        # FP8 samplers (torch_fp8 and SGLang alike) get block-FP8 weights + scales: neither re-quantises.
        fp8_block = cfg.model.fp8_block_size if cfg.sampler.fp8 else 0
        # Several ranks: re-serialising for a late joiner would be a collective walk on rank 0 alone, so the
        # published chunks are kept instead.
        import torch

        # The embedded engine computes in its compute dtype: sending the other tensors (norms, embeddings,
        # everything without FP8) in bf16 rather than as fp32 master weights halves their bytes, same numbers.
        wire_dtype = torch.bfloat16 if cfg.sampler.engine == "torch_fp8" and cfg.sampler.compute_dtype == "bf16" else None
        sender = WeightSender(int(net.weight_chunk_mb * (1 << 20)), fp8_block=fp8_block, dtype=wire_dtype,
                              keep_blobs=net.weight_keep_blobs or self.dist is not None)
        publisher = WeightPublisher(pub, sender, self.log)
        await self.publish(publisher, self.controller.version)

        async def work_handler(msg: Message, peer: bytes | None) -> None:
            await self.on_work(router, publisher, msg, peer)

        tasks = [
            asyncio.create_task(receive_loop(router, work_handler, envelope="identity", max_bytes=opts.max_msg_bytes,
                                             stats=self.stats["work"], log=self.log)),
            asyncio.create_task(receive_loop(pull, self.on_scored, max_bytes=opts.max_msg_bytes,
                                             stats=self.stats["scored"], log=self.log)),
            asyncio.create_task(publisher.run_subscriptions()),
            asyncio.create_task(self.lease_loop()),
        ]
        mark_ready(cfg, "learner")
        trainer_task = asyncio.create_task(self.train_loop(publisher))
        stopper = asyncio.create_task(self.stop.wait())
        code = 0
        try:
            done, _ = await asyncio.wait([trainer_task, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for t in done:
                if t is not stopper and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
            if trainer_task in done:
                self._command({"op": "export", "folder": str(self.run_dir / "final")})
                await asyncio.to_thread(self.trainer.export, self.run_dir / "final")
                for peer in self.peers:
                    await self._send(router, Shutdown(sender="learner", reason="done"), peer)
            else:
                # stopped before num_steps: never exit 0, which the launcher reads as "the run is done"
                code = 128 + (STOP_SIGNAL["signum"] or signal.SIGTERM) if self.stop.is_set() else 1
                self.runlog.event(f"stopped by signal at version {self.controller.version} (exit {code})")
        finally:
            self._command({"op": "stop"})
            for t in [trainer_task, stopper, *tasks]:
                t.cancel()
            await asyncio.gather(trainer_task, stopper, *tasks, return_exceptions=True)
            for s in (router, pub, pull):
                s.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
            self.runlog.close()
        return code


def oldest_version_of_response(r: Any, current: int) -> int:
    return int(r.versions.min()) if r.length else current


def follower(cfg: Config, dist: Any) -> int:
    """Ranks > 0: do what rank 0 says (train the same batch, join weight gathers and checkpoints)."""
    trainer = make_trainer(cfg, Path(cfg.run.dir))
    while True:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0)
        cmd = box[0]
        if cmd["op"] == "step":
            trainer.step(cmd["groups"], cmd["mode"], cmd["version"])
        elif cmd["op"] == "publish":
            for _ in range(cmd["passes"]):
                for _ in trainer.state_fn():
                    pass
        elif cmd["op"] == "export":
            trainer.export(Path(cmd["folder"]))
        elif cmd["op"] == "save":
            trainer.save_checkpoint(cmd["step"], cmd["extra"])
        elif cmd["op"] == "load":
            trainer.load_latest()
        elif cmd["op"] == "stop":
            return 0


def main(args: argparse.Namespace) -> int:
    cfg = config_of(args)
    errors = sanity_errors(cfg)
    if errors:
        raise ConfigError("; ".join(errors))
    dist = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != cfg.learner.world_size:
        raise ConfigError(f"learner.world_size is {cfg.learner.world_size} but {world} ranks were started "
                          f"(torchrun --nnodes x --nproc-per-node); make them agree")
    if world > 1:
        import torch.distributed as torch_dist

        if not torch_dist.is_initialized():
            torch_dist.init_process_group("nccl" if cfg.learner.device.startswith("cuda") else "gloo")
        dist = torch_dist
        if torch_dist.get_rank() != 0:
            return follower(cfg, torch_dist)
    return asyncio.run(LearnerHub(cfg, dist).run())

