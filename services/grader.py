"""Grader service: pulls RolloutGroups, scores every response with the configured grader, pushes
ScoredGroups to the learner.

    minirl-async grader -c configs/tiny.toml --index 0

Sockets: PULL (bind `network.rollout_addr`, port + index for grader `index`) <- samplers' PUSH;
PUSH (connect `network.scored_addr`) -> learner PULL; blocks when the learner falls behind, which in turn
fills our PULL queue and blocks the samplers: back-pressure, not memory growth.
Groups are graded concurrently (at most `grader.concurrency` samples at once, GraderRunner's limit) and
each sample within `grader.timeout_s`. A group the failure policy drops travels on with
`grader_info["dropped"] = True` and its `grader_errors`: the learner re-issues its prompt.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from typing import Any

import numpy as np
import zmq
import zmq.asyncio
from minirl_async.proto.messages import Message, ProtocolError, RolloutGroup, ScoredGroup
from minirl_async.proto.sockets import (
    ChannelStats,
    SocketOptions,
    receive_loop,
    rollout_pull,
    scored_push,
    send_message,
)
from minirl_async.services.common import (
    config_of,
    install_stop_handlers,
    mark_ready,
    nth_addr,
    set_threads,
    setup_logging,
    start_curve_auth,
    stop_code,
)

from minirl_async.config import Config
from minirl_async.graders.base import Sample
from minirl_async.graders.runner import GraderRunner
from minirl_async.tasks.tokenizer import load_tokenizer


class GraderService:
    def __init__(self, cfg: Config, index: int):
        self.cfg, self.index, self.name = cfg, index, f"grader-{index}"
        self.log = setup_logging(self.name)
        self.stop = asyncio.Event()
        self.stats = ChannelStats()
        self.inflight: set[asyncio.Task[None]] = set()
        self.graded_groups = 0
        self.failed_groups = 0  # groups whose scoring raised (forwarded as dropped: the learner re-issues them)

    async def score(self, group: RolloutGroup, push: zmq.asyncio.Socket, runner: GraderRunner, tok: Any) -> None:
        t0 = time.monotonic()
        prompt_text = tok.decode(group.prompt_ids.tolist())
        samples = [Sample(prompt_text=prompt_text, response_text=tok.decode(r.response_ids.tolist()),
                          meta=dict(group.meta), prompt_ids=group.prompt_ids.tolist(),
                          response_ids=r.response_ids.tolist(), finish_reason=r.finish_reason)
                   for r in group.responses]
        result = await runner.grade_group(samples)
        errors = [f"response {i}: {info.get('error')}: {info.get('detail', '')}"
                  for i, (e, info) in enumerate(zip(result.errors, result.infos)) if e is not None]
        timings = dict(group.timings)
        timings["grade_s"] = time.monotonic() - t0
        group.timings = timings
        scored = ScoredGroup.from_rollout(group, rewards=result.rewards,
                                          grader_info={"dropped": bool(result.dropped), "grader": self.name},
                                          grader_errors=errors)
        await send_message(push, scored)
        self.graded_groups += 1

    async def grade(self, group: RolloutGroup, push: zmq.asyncio.Socket, runner: GraderRunner, tok: Any) -> None:
        """score(), in a task nothing awaits: an exception must not end it silently (the group would be lost
        until its lease ends, an hour on GPU configs)."""
        try:
            try:
                await self.score(group, push, runner, tok)
            except Exception as e:
                await self.fail(group, push, e)
        except Exception as e:  # even the failure report could not be sent
            self.log.error("group %s attempt %d lost until its lease ends: %r", group.group_id, group.attempt, e)

    async def fail(self, group: RolloutGroup, push: zmq.asyncio.Socket, error: Exception) -> None:
        """score() raised (e.g. the tokenizer cannot decode an id): forward the group as dropped with the
        error, so the learner re-issues its prompt now (and discards it after a few failures) instead of
        waiting out the lease."""
        self.failed_groups += 1
        text = f"grading failed: {error!r}"[:1000]
        self.log.error("group %s attempt %d: %s (%d groups so far)", group.group_id, group.attempt, text,
                       self.failed_groups)
        scored = ScoredGroup.from_rollout(group, rewards=np.zeros(len(group.responses), np.float32),
                                          grader_info={"dropped": True, "grader": self.name},
                                          grader_errors=[text])
        await send_message(push, scored)

    async def run(self) -> int:
        install_stop_handlers(self.stop)
        set_threads(1)
        runner = GraderRunner.from_config(self.cfg.grader)  # a grader that cannot load fails here, loudly
        tok = load_tokenizer(self.cfg, self.cfg.run.sft_checkpoint or None)
        ctx = zmq.asyncio.Context()
        auth = start_curve_auth(ctx, self.cfg.network)
        opts = SocketOptions.from_config(self.cfg.network)
        pull = rollout_pull(ctx, nth_addr(self.cfg.network.rollout_addr, self.index), opts)
        push = scored_push(ctx, self.cfg.network.scored_addr, opts)
        limit = asyncio.Semaphore(4 * self.cfg.grader.concurrency)  # groups in progress (bounded memory)

        async def handle(msg: Message, _peer: bytes | None) -> None:
            if not isinstance(msg, RolloutGroup) or isinstance(msg, ScoredGroup):
                raise ProtocolError(f"unexpected {msg.TYPE} on the rollout channel")
            await limit.acquire()  # blocks the receive loop: the PULL queue, then the samplers, wait

            async def job() -> None:
                try:
                    await self.grade(msg, push, runner, tok)
                finally:
                    limit.release()

            task = asyncio.create_task(job())
            self.inflight.add(task)
            task.add_done_callback(self.inflight.discard)

        loop_task = asyncio.create_task(receive_loop(pull, handle, max_bytes=opts.max_msg_bytes,
                                                     stats=self.stats, log=self.log))
        mark_ready(self.cfg, self.name)
        stopper = asyncio.create_task(self.stop.wait())
        try:
            done, _ = await asyncio.wait([loop_task, stopper], return_when=asyncio.FIRST_COMPLETED)
            if loop_task in done and loop_task.exception() is not None:
                raise loop_task.exception()  # type: ignore[misc]
        finally:
            for t in [loop_task, stopper, *self.inflight]:
                t.cancel()
            await asyncio.gather(loop_task, stopper, *self.inflight, return_exceptions=True)
            runner.close()
            pull.close(linger=0)
            push.close(linger=0)
            if auth is not None:
                auth.stop()
            ctx.term()
        self.log.info("stopped after %d groups (%d failed); grader stats %s; bad messages %d", self.graded_groups,
                      self.failed_groups, runner.stats(), self.stats.errors)
        return stop_code()   # graders stop only by a signal: 128 + signum, restarted while the run goes on


def main(args: argparse.Namespace) -> int:
    return asyncio.run(GraderService(config_of(args), int(getattr(args, "index", 0))).run())
