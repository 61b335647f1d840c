"""The grader runner under bad graders: raises, hangs (sync and async), returns NaN / inf / None / a string,
fails to import at call time. Each failure is counted by kind, the policy (zero / drop_group) applied, and
the runner keeps grading afterwards. Also: concurrency limit and async graders."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from typing import Any

import pytest

from minirl_async.graders.base import GradeResult, Sample
from minirl_async.graders.runner import ERROR_KINDS, GraderRunner


def _samples(*responses: str) -> list[Sample]:
    return [Sample("q", r, {"answer": "ok"}) for r in responses]


def behaving_badly(sample: Sample) -> Any:
    """Misbehaves according to the response text; 'ok' grades 1.0."""
    r = sample.response_text
    if r == "raise":
        raise RuntimeError("grader bug")
    if r == "hang":
        time.sleep(3)
        return 1.0
    if r == "import":
        import definitely_not_installed_pkg  # type: ignore[import-not-found]  # noqa: F401
    return {"nan": math.nan, "inf": math.inf, "-inf": -math.inf, "none": None, "str": "1.0", "list": [1.0],
            "ok": 1.0, "bad": 0.0, "true": True, "result": GradeResult(0.5, {"why": "half"})}[r]


EXPECTED_KIND = {"raise": "raised", "hang": "timeout", "import": "import", "nan": "non_finite",
                 "inf": "non_finite", "-inf": "non_finite", "none": "bad_type", "str": "bad_type",
                 "list": "bad_type"}


@pytest.mark.parametrize("bad", sorted(EXPECTED_KIND))
@pytest.mark.parametrize("policy", ["zero", "drop_group"])
def test_each_failure_kind_is_counted_and_policy_applied(bad: str, policy: str) -> None:
    runner = GraderRunner(behaving_badly, concurrency=4, timeout_s=0.3, failure_policy=policy)  # type: ignore[arg-type]
    res = asyncio.run(runner.grade_group(_samples("ok", bad, "bad")))
    assert res.errors == [None, EXPECTED_KIND[bad], None]
    assert res.rewards == [1.0, 0.0, 0.0]
    assert res.infos[1]["error"] == EXPECTED_KIND[bad] and res.infos[1]["detail"]
    assert res.dropped == (policy == "drop_group")
    assert runner.error_counts == {EXPECTED_KIND[bad]: 1}
    stats = runner.stats()
    assert stats["errors"] == 1 and stats[f"errors/{EXPECTED_KIND[bad]}"] == 1
    # The runner keeps going: the next group grades normally.
    again = asyncio.run(runner.grade_group(_samples("ok", "result", "true")))
    assert again.rewards == [1.0, 0.5, 1.0] and not again.dropped and again.errors == [None] * 3
    assert again.infos[1] == {"why": "half"}
    runner.close()


def test_all_kinds_in_one_group_are_all_counted() -> None:
    runner = GraderRunner(behaving_badly, concurrency=16, timeout_s=0.3, failure_policy="zero")
    res = asyncio.run(runner.grade_group(_samples(*EXPECTED_KIND, "ok")))
    assert res.num_errors == len(EXPECTED_KIND) and res.rewards[-1] == 1.0
    assert set(runner.error_counts) == set(ERROR_KINDS)
    assert sum(runner.error_counts.values()) == len(EXPECTED_KIND)
    runner.close()


def test_hanging_async_grader_is_cancelled() -> None:
    cancelled = []

    async def slow(sample: Sample) -> float:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.append(True)
            raise
        return 1.0

    runner = GraderRunner(slow, timeout_s=0.2, failure_policy="zero")
    t0 = time.monotonic()
    res = asyncio.run(runner.grade_group(_samples("a", "b")))
    assert res.errors == ["timeout", "timeout"] and cancelled == [True, True]
    assert time.monotonic() - t0 < 5


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_system_exit_and_keyboard_interrupt_of_a_grader_are_its_failure(exc: BaseException) -> None:
    def sync(sample: Sample) -> float:
        raise exc

    async def coro(sample: Sample) -> float:
        raise exc

    for grader in (sync, coro):
        runner = GraderRunner(grader, timeout_s=1.0, failure_policy="zero")
        res = asyncio.run(runner.grade_group(_samples("a", "b")))   # escaped before: ended the event loop
        assert res.errors == ["raised", "raised"] and type(exc).__name__ in res.infos[0]["detail"]
        runner.close()


def test_async_grader_that_ignores_cancellation_is_abandoned_at_the_timeout() -> None:
    done = threading.Event()

    async def stubborn(sample: Sample) -> float:
        for _ in range(30):
            try:
                await asyncio.sleep(0.1)
            except asyncio.CancelledError:
                pass   # swallowed: keeps running
        done.set()
        return 1.0

    async def main() -> tuple[Any, float, int]:
        t0 = time.monotonic()
        res = await runner.grade_group(_samples("a"))
        elapsed, live = time.monotonic() - t0, runner.abandoned_tasks
        while not done.is_set():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0)
        return res, elapsed, live

    runner = GraderRunner(stubborn, timeout_s=0.3, failure_policy="zero")
    res, elapsed, live = asyncio.run(main())
    assert res.errors == ["timeout"] and res.rewards == [0.0]   # not the 1.0 it returns 3 s later
    assert elapsed < 2.0 and live == 1 and runner.abandoned_tasks == 0   # waited 3.0 s before
    runner.close()


def test_a_sync_grader_returning_a_coroutine_shares_one_deadline() -> None:
    async def rest() -> float:
        await asyncio.sleep(0.25)
        return 1.0

    def grader(sample: Sample) -> Any:
        time.sleep(0.25)
        return rest()

    runner = GraderRunner(grader, timeout_s=0.4, failure_policy="zero")
    res = asyncio.run(runner.grade_group(_samples("a")))
    assert res.errors == ["timeout"]   # 0.5 s in all; each part alone fits in 0.4 s
    runner.close()


def test_stuck_sync_threads_do_not_block_later_groups() -> None:
    release = threading.Event()

    def stuck_then_fine(sample: Sample) -> float:
        if sample.response_text == "stuck":
            release.wait(5)
        return 1.0

    runner = GraderRunner(stuck_then_fine, concurrency=3, timeout_s=0.2, failure_policy="zero")
    first = asyncio.run(runner.grade_group(_samples("stuck", "stuck")))
    assert first.errors == ["timeout", "timeout"]
    # Abandoned threads do not hold grading slots: the next group grades at full concurrency.
    second = asyncio.run(runner.grade_group(_samples("ok", "ok", "ok")))
    assert second.rewards == [1.0, 1.0, 1.0]
    release.set()
    runner.close()


def test_stuck_count_returns_to_zero_when_hung_graders_finish() -> None:
    release = threading.Event()

    def hangs(sample: Sample) -> float:
        release.wait(10)
        return 1.0

    runner = GraderRunner(hangs, concurrency=3, timeout_s=0.1, failure_policy="zero")
    res = asyncio.run(runner.grade_group(_samples("a", "b")))
    assert res.errors == ["timeout", "timeout"] and runner.stuck_threads == 2
    release.set()
    deadline = time.monotonic() + 10
    while runner.stuck_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.stuck_threads == 0
    runner.close()


def test_time_waiting_behind_stuck_threads_does_not_count_against_the_timeout() -> None:
    # One grader hangs (abandoned, its thread still running). Then "first" waits until "second" has started:
    # both must run at once; with a pool whose worker is stuck, "second" would queue behind "first" and the
    # time queued would count against the timeout of both.
    release, second_started = threading.Event(), threading.Event()

    def grader(sample: Sample) -> float:
        if sample.response_text == "hang":
            release.wait(10)
        elif sample.response_text == "first":
            return float(second_started.wait(10))
        elif sample.response_text == "second":
            second_started.set()
        return 1.0

    runner = GraderRunner(grader, concurrency=2, timeout_s=1.0, failure_policy="zero")
    first = asyncio.run(runner.grade_group(_samples("hang")))
    assert first.errors == ["timeout"] and runner.stuck_threads == 1
    res = asyncio.run(runner.grade_group(_samples("first", "second")))
    assert res.errors == [None, None] and res.rewards == [1.0, 1.0]
    release.set()
    runner.close()


def test_after_concurrency_hung_graders_a_normal_one_waits_for_capacity_then_succeeds() -> None:
    release = threading.Event()
    events: list[str] = []

    def grader(sample: Sample) -> float:
        if sample.response_text == "hang":
            release.wait(10)
            return 1.0
        events.append("graded")
        return 1.0

    runner = GraderRunner(grader, concurrency=2, timeout_s=0.2, failure_policy="zero")
    hung = asyncio.run(runner.grade_group(_samples("hang", "hang")))
    assert hung.errors == ["timeout", "timeout"] and runner.stuck_threads == 2

    async def normal_while_stuck() -> Any:
        task = asyncio.ensure_future(runner.grade_group(_samples("ok")))
        await asyncio.sleep(0.5)  # longer than timeout_s: waiting for capacity is not grading time
        events.append("released")
        release.set()
        return await task

    res = asyncio.run(normal_while_stuck())
    # Every thread slot was held by a hung grader: the normal one started only once one of them finished.
    assert events == ["released", "graded"]
    assert res.errors == [None] and res.rewards == [1.0]
    deadline = time.monotonic() + 10
    while runner.stuck_threads and time.monotonic() < deadline:
        time.sleep(0.01)
    assert runner.stuck_threads == 0
    runner.close()


def test_concurrency_limit_is_respected() -> None:
    active, peak = 0, 0

    async def counting(sample: Sample) -> float:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return 1.0

    runner = GraderRunner(counting, concurrency=3, timeout_s=5)
    for _ in range(2):  # the runner is reusable across event loops (eval calls asyncio.run per batch)
        res = asyncio.run(runner.grade_group(_samples(*["x"] * 20)))
        assert res.rewards == [1.0] * 20 and peak == 3


def test_invalid_policy_is_rejected() -> None:
    with pytest.raises(ValueError, match="failure_policy"):
        GraderRunner(behaving_badly, failure_policy="ignore")  # type: ignore[arg-type]


def test_graders_that_bound_their_own_work_are_told_the_timeout() -> None:
    # A grader with fit_time_budget learns the per-sample limit when the runner is built (from_config too),
    # so it can end what the response controls (a looping program, a slow expression) below it.
    class Bounded:
        budget: float | None = None

        def fit_time_budget(self, seconds: float) -> None:
            self.budget = seconds

        def __call__(self, sample: Sample) -> float:
            return 1.0

    g = Bounded()
    runner = GraderRunner(g, timeout_s=4.5)
    assert g.budget == 4.5
    assert asyncio.run(runner.grade_group(_samples("x"))).rewards == [1.0]
    runner.close()
