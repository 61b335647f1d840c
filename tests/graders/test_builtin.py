"""Built-in answer graders: exact, numeric, math (extraction and normalisation), with positive and negative
cases, and the error they raise when the task metadata has no answer."""

from __future__ import annotations

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
])
def test_math(response: str, answer: str, expected: float) -> None:
    assert _r("math", response, answer) == expected


@pytest.mark.parametrize("name", ["exact", "numeric", "math"])
def test_missing_answer_raises_a_clear_error(name: str) -> None:
    with pytest.raises(ValueError, match="no 'answer'"):
        load_grader(name)(Sample("q", "1", {}))
