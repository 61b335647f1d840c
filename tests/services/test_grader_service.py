"""The grader service forwards a group whose scoring raised as dropped, with the error, so the learner
re-issues its prompt at once instead of losing it until the lease ends."""

from __future__ import annotations

import asyncio

import numpy as np
import zmq
import zmq.asyncio
from minirl_async.proto.codec import decode
from minirl_async.proto.messages import Response, RolloutGroup, ScoredGroup
from minirl_async.services.grader import GraderService

from minirl_async.config import Config
from minirl_async.graders.runner import GraderRunner
from minirl_async.tasks.tokenizer import build_char_tokenizer


def rollout(gid: str, response_ids: list[int]) -> RolloutGroup:
    r = len(response_ids)
    responses = [Response(response_ids=np.array(response_ids, np.int32), logprobs=np.zeros(r, np.float32),
                          versions=np.zeros(r, np.int32), routes=None, finish_reason="stop") for _ in range(2)]
    return RolloutGroup(group_id=gid, attempt=0, prompt_ids=np.array([1, 7], np.int32), meta={"answer": "1"},
                        sampler_id="s", responses=responses)


def grade_one(group: RolloutGroup) -> tuple[GraderService, ScoredGroup]:
    cfg = Config()
    svc = GraderService(cfg, 0)
    runner = GraderRunner.from_config(cfg.grader)

    async def go() -> ScoredGroup:
        ctx = zmq.asyncio.Context()
        pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
        pull.bind("inproc://scored")
        push.connect("inproc://scored")
        try:
            await asyncio.wait_for(svc.grade(group, push, runner, build_char_tokenizer()), 10)
            frames = await asyncio.wait_for(pull.recv_multipart(copy=False), 10)
            msg = decode(frames)
            assert isinstance(msg, ScoredGroup)
            return msg
        finally:
            pull.close(linger=0)
            push.close(linger=0)
            ctx.term()

    try:
        return svc, asyncio.run(go())
    finally:
        runner.close()


def test_scoring_exception_forwards_the_group_as_dropped():
    # the char tokenizer cannot decode a negative id (OverflowError inside score())
    svc, msg = grade_one(rollout("g0", [3, -1]))
    assert (msg.group_id, msg.attempt, svc.failed_groups, svc.graded_groups) == ("g0", 0, 1, 0)
    assert msg.grader_info["dropped"] is True and msg.grader_info["grader"] == "grader-0"
    assert len(msg.grader_errors) == 1 and "OverflowError" in msg.grader_errors[0]
    assert msg.rewards.tolist() == [0.0, 0.0]   # never trained on: the learner re-issues a dropped group


def test_scored_group_is_forwarded():
    svc, msg = grade_one(rollout("g1", [3, 4]))
    assert (msg.group_id, svc.failed_groups, svc.graded_groups) == ("g1", 0, 1)
    assert msg.grader_info["dropped"] is False and len(msg.rewards) == 2
