"""The grader runner: grades whole groups concurrently, bounds time per sample, and turns every grader
failure into a counted, policy-handled outcome instead of a crash.

Failure kinds (counted in `GraderRunner.error_counts`): `raised` (the grader raised), `import` (it raised
ImportError at call time), `timeout` (over `timeout_s`), `non_finite` (NaN or inf), `bad_type` (None, a
string, or anything not a number / GradeResult). Policy (`grader.failure_policy`):
- `zero`: a failed sample scores 0.0 and the group is kept;
- `drop_group`: the group is marked `dropped` (the controller re-issues the prompt; nothing is trained on).

Sync graders run each call in its own daemon thread (so a slow one does not stall the event loop, and the
timeout clock starts when the grader starts, never while it waits for a worker). A sync grader that hangs
cannot be killed from Python: its thread is abandoned at the timeout and counted in `stuck_threads` until it
finishes (a done-callback takes it off). Abandoned threads do not hold a grading slot, but at most
`concurrency` of them may exist: beyond that new sync calls wait (not timed) until one finishes, so a
grader that hangs for good costs at most 2 x `concurrency` threads, never an unbounded number. Async graders
are cancelled at the timeout and not waited for (one that swallows the cancellation keeps running in the
background, counted in `abandoned_tasks` until it ends; one that blocks the event loop cannot be bounded:
make it sync). The
time of a sync grader that returns an awaitable counts against the same deadline. Whatever a grader raises,
SystemExit and KeyboardInterrupt included, is a `raised` failure of that sample, never of the process. Code
under test never runs here: the `code` grader runs it in a sandboxed subprocess.

A grader with a `fit_time_budget(seconds)` method (the built-in `code` and `math` graders) is told
`timeout_s` when the runner is built, and keeps all its work on one sample a margin below it: what the graded
response controls (a program that never ends, an expression that is slow to simplify) then scores 0 inside
the grader rather than becoming a `timeout` failure that drops the group.

    runner = GraderRunner.from_config(cfg.grader)        # loads the grader now: import errors surface at start
    result = await runner.grade_group(samples)           # GroupGrade(rewards, infos, errors, dropped)
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import logging
import math
import numbers
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

from minirl_async.config import GraderSection
from minirl_async.graders.base import Grader, GradeResult, Sample, load_grader

log = logging.getLogger(__name__)

ERROR_KINDS = ("raised", "import", "timeout", "non_finite", "bad_type")


class GradeFailure(Exception):
    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind, self.detail = kind, detail


@dataclass
class GroupGrade:
    """The grading of one group, aligned with its samples."""

    rewards: list[float]
    """Reward per sample (0.0 for a failed sample under either policy)."""
    infos: list[dict[str, Any]]
    """Grader info per sample; failed samples carry {"error": kind, "detail": message}."""
    errors: list[str | None] = field(default_factory=list)
    """Failure kind per sample, None when graded."""
    dropped: bool = False
    """True when the policy is drop_group and a sample failed: do not train on this group."""

    @property
    def num_errors(self) -> int:
        return sum(e is not None for e in self.errors)


def _is_async(grader: Any) -> bool:
    target = grader.func if hasattr(grader, "func") and hasattr(grader, "args") else grader  # functools.partial
    return inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__)


def to_result(out: Any) -> GradeResult:
    """Validate a grader's return value; raises GradeFailure('bad_type' | 'non_finite')."""
    if isinstance(out, GradeResult):
        reward, info = out.reward, dict(out.info)
    else:
        reward, info = out, {}
    if isinstance(reward, bool):
        reward = float(reward)
    if not isinstance(reward, numbers.Real):
        raise GradeFailure("bad_type", f"grader returned {type(reward).__name__} {reward!r:.80}, expected a number")
    reward = float(reward)
    if not math.isfinite(reward):
        raise GradeFailure("non_finite", f"grader returned {reward}")
    return GradeResult(reward, info)


class GraderRunner:
    """Concurrency limit, per-sample timeout and failure policy around one grader."""

    def __init__(self, grader: Grader, concurrency: int = 8, timeout_s: float = 10.0,
                 failure_policy: Literal["drop_group", "zero"] = "drop_group"):
        if failure_policy not in ("drop_group", "zero"):
            raise ValueError(f"grader.failure_policy must be 'drop_group' or 'zero' (got {failure_policy!r})")
        if concurrency < 1 or timeout_s <= 0:
            raise ValueError("grader.concurrency must be >= 1 and grader.timeout_s > 0")
        self.grader, self.concurrency, self.timeout_s, self.policy = grader, concurrency, timeout_s, failure_policy
        fit = getattr(grader, "fit_time_budget", None)
        if callable(fit):  # the grader bounds its own work below our timeout (see the module docstring)
            fit(timeout_s)
        self.is_async = _is_async(grader)
        self.error_counts: Counter[str] = Counter()
        self.num_graded = 0
        self.num_dropped_groups = 0
        self._sem: asyncio.Semaphore | None = None
        self._sem_loop: asyncio.AbstractEventLoop | None = None
        self._stuck_lock = threading.Lock()  # abandoned threads finish (and uncount) on their own threads
        self._stuck_threads = 0
        self.abandoned_tasks = 0  # async calls cancelled at their timeout that have not ended yet

    @classmethod
    def from_config(cls, section: GraderSection) -> GraderRunner:
        """Load `grader.name` with `grader.kwargs` (GraderLoadError now, naming the path) and wrap it."""
        grader = load_grader(section.name, section.kwargs)
        return cls(grader, section.concurrency, section.timeout_s, section.failure_policy)

    @property
    def stuck_threads(self) -> int:
        """Sync grader threads abandoned at the timeout that are still running."""
        return self._stuck_threads

    def _unstick(self, _fut: concurrent.futures.Future[Any]) -> None:
        with self._stuck_lock:
            self._stuck_threads -= 1

    async def _wait_for_thread_capacity(self) -> None:
        # Polled rather than awaited on a condition: threads finish on their own, possibly after the event
        # loop that abandoned them closed (the runner is reused across asyncio.run calls).
        warned = False
        while self._stuck_threads >= self.concurrency:
            if not warned:
                log.warning("all %d stuck-thread slots are held by hung sync graders; grading waits for one to "
                            "finish (fix the grader, or make it async so it can be cancelled)", self.concurrency)
                warned = True
            await asyncio.sleep(0.02)

    def _start_thread(self, sample: Sample) -> concurrent.futures.Future[Any]:
        fut: concurrent.futures.Future[Any] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()  # running: cancelling the asyncio wrapper cannot cancel it

        def run() -> None:
            try:
                fut.set_result(self.grader(sample))
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting coroutine, which classifies it
                fut.set_exception(e)

        threading.Thread(target=run, name="grader", daemon=True).start()
        return fut

    async def _await_until(self, awaitable: Any, deadline: float) -> Any:
        """The awaitable's result, run as its own task until `deadline`: past it the task is cancelled and
        abandoned, not awaited (a grader that swallows CancelledError would hold the sample forever).
        Anything it raises comes back as an exception of this call: SystemExit and KeyboardInterrupt
        escaping a task would end the event loop instead."""
        async def guarded() -> tuple[bool, Any]:
            try:
                return True, await awaitable
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - returned, re-raised in the caller's task
                return False, e

        task = asyncio.ensure_future(guarded())
        done, _ = await asyncio.wait({task}, timeout=max(deadline - time.monotonic(), 0.0))
        if not done:
            task.cancel()
            self.abandoned_tasks += 1
            task.add_done_callback(self._task_ended)
            raise TimeoutError
        ok, value = task.result()
        if not ok:
            raise value
        return value

    def _task_ended(self, _task: asyncio.Future[Any]) -> None:
        self.abandoned_tasks -= 1

    async def _call(self, sample: Sample) -> Any:
        deadline = time.monotonic() + self.timeout_s
        if self.is_async:
            return await self._await_until(self.grader(sample), deadline)
        await self._wait_for_thread_capacity()
        deadline = time.monotonic() + self.timeout_s   # the clock starts with the thread
        fut = self._start_thread(sample)  # the timeout starts now, with the grader running
        waiter = asyncio.wrap_future(fut)
        try:
            await asyncio.wait({waiter}, timeout=self.timeout_s)
        finally:
            if not fut.done():  # timed out (or we were cancelled): abandon the thread, count it until it ends
                with self._stuck_lock:
                    self._stuck_threads += 1
                fut.add_done_callback(self._unstick)  # runs at once if it finished in between
                waiter.cancel()
        if waiter.cancelled():
            raise TimeoutError
        if waiter.done():
            out = waiter.result()  # re-raises what the grader raised (and marks it retrieved)
        else:  # finished just at the timeout: its result is still on its way to the loop
            waiter.cancel()
            out = fut.result()
        if inspect.isawaitable(out):  # a sync callable that returned a coroutine: what is left of the deadline
            out = await self._await_until(out, deadline)
        return out

    async def grade(self, sample: Sample) -> tuple[GradeResult | None, str | None, str]:
        """(result, None, "") on success, (None, kind, detail) on failure; never raises for grader faults."""
        loop = asyncio.get_running_loop()
        if self._sem is None or self._sem_loop is not loop:  # a semaphore belongs to one event loop
            self._sem, self._sem_loop = asyncio.Semaphore(self.concurrency), loop
        async with self._sem:
            try:
                out = await self._call(sample)
                return to_result(out), None, ""
            except GradeFailure as e:
                return None, e.kind, e.detail
            except TimeoutError:
                return None, "timeout", f"grader took longer than grader.timeout_s = {self.timeout_s}s"
            except ImportError as e:
                return None, "import", f"{type(e).__name__}: {e}"
            except asyncio.CancelledError:
                raise
            except BaseException as e:  # noqa: BLE001 - SystemExit / KeyboardInterrupt of a grader: its failure
                return None, "raised", f"{type(e).__name__}: {e}"

    async def grade_group(self, samples: list[Sample]) -> GroupGrade:
        """Grade every sample of a group concurrently and apply the failure policy."""
        outcomes = await asyncio.gather(*(self.grade(s) for s in samples))
        rewards, infos, errors = [], [], []
        for result, kind, detail in outcomes:
            self.num_graded += 1
            if result is None:
                assert kind is not None
                self.error_counts[kind] += 1
                rewards.append(0.0)
                infos.append({"error": kind, "detail": detail})
            else:
                rewards.append(result.reward)
                infos.append(result.info)
            errors.append(kind)
        dropped = self.policy == "drop_group" and any(e is not None for e in errors)
        self.num_dropped_groups += dropped
        return GroupGrade(rewards, infos, errors, dropped)

    def stats(self) -> dict[str, int]:
        """Counters for metrics: graded samples, dropped groups, errors in total and by kind."""
        out = {"graded": self.num_graded, "dropped_groups": self.num_dropped_groups,
               "errors": sum(self.error_counts.values())}
        out.update({f"errors/{k}": self.error_counts.get(k, 0) for k in ERROR_KINDS})
        return out

    def close(self) -> None:
        """Nothing to release: grader threads are daemons (a hung one never blocks interpreter exit)."""
