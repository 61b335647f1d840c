"""Built-in answer graders: exact, numeric, math (extraction and normalisation), with positive and negative
cases, and the error they raise when the task metadata has no answer. Commas are thousands separators only;
numbers too large to handle score 0 quickly instead of raising or stalling; math_verify (when installed)
works from the runner's threads and is bounded in time."""

from __future__ import annotations

import asyncio
import time

import pytest

from minirl_async.graders.base import GradeResult, Sample, extract_answer, load_grader


def _r(name: str, response: str, answer: str, **kw: object) -> float:
    out = load_grader(name, kw)(Sample("q", response, {"answer": answer}))
    assert isinstance(out, GradeResult)
    return out.reward


def test_extract_answer() -> None:
    assert extract_answer("a####1####  42 ") == "42"
    assert extract_answer(" 42\n") == "42"


@pytest.mark.parametrize("response,answer,expected", [
    ("7+5=12####12", "12", 1.0), ("7+5=12####13", "12", 0.0), ("12", "12", 1.0), ("12 ", "12", 1.0),
    ("####012", "12", 0.0), ("", "12", 0.0),
])
def test_exact(response: str, answer: str, expected: float) -> None:
    assert _r("exact", response, answer) == expected


def test_exact_case() -> None:
    assert _r("exact", "Paris", "paris") == 0.0
    assert _r("exact", "Paris", "paris", case_sensitive=False) == 1.0


@pytest.mark.parametrize("response,answer,expected", [
    ("so the total is 1,234.", "1234", 1.0), ("x = -3.50", "-3.5", 1.0), ("1/4", "0.25", 1.0),
    ("it is 41", "42", 0.0), ("no number", "1", 0.0), ("1e3 apples", "1000", 1.0),
])
def test_numeric(response: str, answer: str, expected: float) -> None:
    assert _r("numeric", response, answer) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("half of it: 1/2", "1/2", 1.0), ("0.5", "1/2", 1.0), ("1/3", "1/2", 0.0), ("-3/4", "-3/4", 1.0),
    ("x = -0.75", "-3/4", 1.0), ("1,000/4", "250", 1.0),
])
def test_numeric_fraction_reference(response: str, answer: str, expected: float) -> None:
    assert _r("numeric", response, answer) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("the date is 2024-01-05", "5", 1.0), ("the date is 2024-01-05", "-5", 0.0), ("x-3", "3", 1.0),
    ("x-3", "-3", 0.0), ("a_-2", "2", 1.0), ("so it is -5", "-5", 1.0), ("(-5)", "-5", 1.0),
    ("5 - -2 = 7, so -2", "-2", 1.0), ("1e-3", "0.001", 1.0),
])
def test_numeric_hyphen_joined_tokens_are_not_negative(response: str, answer: str, expected: float) -> None:
    assert _r("numeric", response, answer) == expected


def test_numeric_non_number_reference_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a number"):
        _r("numeric", "12", "twelve")


def test_numeric_tolerance() -> None:
    assert _r("numeric", "3.1416", "3.14159") == 0.0
    assert _r("numeric", "3.1416", "3.14159", tolerance=1e-3) == 1.0
    assert _r("numeric", "1010", "1000", rel_tolerance=0.02) == 1.0


@pytest.mark.parametrize("response,answer,expected", [
    ("thus $\\boxed{\\frac{1}{2}}$.", "1/2", 1.0),
    ("\\boxed{\\dfrac{3}{4}}", "\\frac{3}{4}", 1.0),
    ("\\boxed{0.5}", "\\frac12", 1.0),
    ("\\boxed{x = 7}", "7", 1.0),
    ("\\boxed{\\text{(B)}}", "(B)", 1.0),
    ("\\boxed{45^\\circ}", "45", 1.0),
    ("The answer is 12.", "12", 1.0),
    ("\\boxed{\\frac{1}{3}}", "1/2", 0.0),
    ("\\boxed{8} then later 9", "9", 0.0),  # the boxed answer wins over a trailing number
    ("steps####128", "128", 1.0),
    # common phrasings (each scored 0 before)
    ("The answer is: 42", "42", 1.0), ("The answer is 42, as required.", "42", 1.0),
    ("The answer is **42**.", "42", 1.0), ("Answer: 7 apples", "7", 1.0), ("\\boxed{\\$5}", "5", 1.0),
    ("\\boxed{1{,}000}", "1000", 1.0),
    # ... without accepting more than the first number of the answer sentence
    ("The answer is 41, or 42.", "42", 0.0), ("Answer: 7 apples", "8", 0.0), ("The answer is **41**.", "42", 0.0),
])
def test_math(response: str, answer: str, expected: float) -> None:
    assert _r("math", response, answer) == expected


@pytest.mark.parametrize("name", ["exact", "numeric", "math"])
def test_missing_answer_raises_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="no 'answer'"):
        load_grader(name)(Sample("q", "1", {}))


@pytest.mark.parametrize("response,answer,expected", [
    ("\\boxed{4,2}", "42", 0.0), ("\\boxed{12}", "(1,2)", 0.0), ("\\boxed{(1, 2)}", "(1,2)", 1.0),
    ("\\boxed{4,200}", "4200", 1.0), ("\\boxed{1,234,567}", "1234567", 1.0), ("\\boxed{[1,2)}", "[1,2)", 1.0),
    ("\\boxed{(1,2)}", "[1,2]", 0.0), ("\\boxed{\\frac{-1}{2}}", "-0.5", 1.0), ("\\boxed{(-5)}", "-5", 1.0),
])
def test_math_commas_are_thousands_separators_only(response: str, answer: str, expected: float) -> None:
    assert _r("math", response, answer) == expected


@pytest.mark.parametrize("response,answer,expected", [
    ("so it is 4,2", "42", 0.0), ("so it is 4,2", "2", 1.0), ("5, then stop", "5", 1.0), ("12,345.5", "12345.5", 1.0),
])
def test_numeric_commas_are_thousands_separators_only(response: str, answer: str, expected: float) -> None:
    assert _r("numeric", response, answer) == expected


HUGE = ["1e400", "-1e400", "1e-400", "1e15000000", "9" * 5000, "1" * 15_000_000, "1e999999999999999999",
        "1/1e15000000", "1e15000000/3"]


@pytest.mark.parametrize("name", ["numeric", "math"])
@pytest.mark.parametrize("huge", HUGE, ids=lambda h: h[:24])
def test_huge_numbers_in_a_response_score_quickly_and_never_raise(name: str, huge: str) -> None:
    kw = {"use_math_verify": False} if name == "math" else {}  # the built-in parser (math_verify has its own bound)
    t0 = time.monotonic()
    assert _r(name, f"the answer is {huge}", "5", **kw) == 0.0
    assert _r(name, f"\\boxed{{{huge}}}", "7", **kw) == 0.0
    assert time.monotonic() - t0 < 2.0


def test_numbers_compare_exactly_not_as_floats() -> None:
    assert _r("numeric", "1e400", "1e400") == 1.0  # float() would overflow
    assert _r("numeric", "1e400", "2e400") == 0.0
    assert _r("math", "\\boxed{1e400}", "1e400") == 1.0
    # 21 digits: the same float, different integers
    assert _r("numeric", "123456789012345678901", "123456789012345678900", tolerance=0.5) == 0.0
    assert _r("numeric", "1e-400", "0") == 1.0  # within the absolute tolerance
    assert _r("numeric", "1e-400", "0", tolerance=0.0) == 0.0


def test_a_reference_beyond_the_limits_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="not a number"):
        _r("numeric", "5", "1e15000000")
    with pytest.raises(ValueError, match="tolerance"):
        load_grader("numeric", {"tolerance": float("inf")})


def test_math_verify_runs_under_the_runner_threads() -> None:
    # math_verify's own timeouts use SIGALRM, which raises in the runner's worker threads: every sample
    # would fail and every group be dropped. The grader runs it in worker processes instead.
    pytest.importorskip("math_verify")
    from minirl_async.graders.builtin import MathGrader
    from minirl_async.graders.runner import GraderRunner

    grader = MathGrader(verify_timeout_s=60.0)
    runner = GraderRunner(grader, concurrency=4, timeout_s=8.0, failure_policy="drop_group")
    assert grader.verify_timeout_s <= 4.0  # fitted below the runner's limit
    try:
        responses = ["\\boxed{\\sqrt{4}}", "so $\\boxed{2}$", "\\boxed{3}", "\\boxed{4/2}", "\\boxed{(1,2)}"]
        res = asyncio.run(runner.grade_group([Sample("q", r, {"answer": "2"}) for r in responses]))
        assert res.errors == [None] * 5 and not res.dropped, res
        assert res.rewards == [1.0, 1.0, 0.0, 1.0, 0.0], res
        assert res.infos[0] == {"extracted": "math_verify"}  # sqrt(4) = 2: only math_verify knows that
        # An expression sympy cannot finish: the worker is killed at the budget, the built-in comparison
        # decides (a 0), and the sample is graded, not failed.
        t0 = time.monotonic()
        res = asyncio.run(runner.grade_group([Sample("q", "\\boxed{9^{9^{9^{9}}}}", {"answer": "5"}),
                                              Sample("q", "\\boxed{5}", {"answer": "5"})]))
        assert res.errors == [None, None] and res.rewards == [0.0, 1.0] and not res.dropped, res
        assert "math_verify" in res.infos[0] and time.monotonic() - t0 < 8.0
    finally:
        grader.close()
