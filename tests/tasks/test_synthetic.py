"""Synthetic tasks: determinism per seed, resumable cursor, disjoint splits, varying lengths, and every worked
solution graded correct by its own grader while wrong answers are graded wrong."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minirl_async.config import load_config
from minirl_async.graders.base import Sample, load_grader
from minirl_async.tasks.base import split_of, take
from minirl_async.tasks.source import make_prompt_source
from minirl_async.tasks.synthetic import FAMILIES, SyntheticSource, addition_solution, parse_task_names


def _src(task: str = "arith", difficulty: int = 2, seed: int = 0, split: str = "train") -> SyntheticSource:
    return SyntheticSource(parse_task_names(task), difficulty, seed, split)  # type: ignore[arg-type]


@pytest.mark.parametrize("task", ["arith", "list", "arith,list"])
def test_same_seed_same_stream_other_seed_other_stream(task: str) -> None:
    a, b, c = take(_src(task), 200), take(_src(task), 200), take(_src(task, seed=1), 200)
    assert a == b
    assert [p.uid for p in a] != [p.uid for p in c]


def test_cursor_resumes_the_same_stream() -> None:
    src = _src("arith,list")
    take(src, 37)
    state = src.state_dict()
    expected = take(src, 50)
    fresh = _src("arith,list")
    fresh.load_state_dict(state)
    assert take(fresh, 50) == expected
    with pytest.raises(ValueError, match="data.seed"):
        _src("arith,list", seed=5).load_state_dict(state)


@pytest.mark.parametrize("task,difficulty", [("arith", 2), ("list,arith", 2), ("arith,list", 3)])
def test_cursor_refuses_other_families_or_difficulty(task: str, difficulty: int) -> None:
    src = _src("arith,list", difficulty=2)
    take(src, 5)
    with pytest.raises(ValueError, match=r"data.task = 'arith,list', data.difficulty = 2 .*"
                       rf"data.task = '{task}', data.difficulty = {difficulty}"):
        _src(task, difficulty=difficulty).load_state_dict(src.state_dict())


@pytest.mark.parametrize("task,difficulty", [("arith", 1), ("arith", 2), ("list", 1), ("list", 3)])
def test_train_and_eval_never_overlap(task: str, difficulty: int) -> None:
    train = take(_src(task, difficulty), 3000)
    held = take(_src(task, difficulty, split="eval"), 300)
    assert {p.uid for p in train}.isdisjoint({p.uid for p in held})
    assert all(split_of(p.uid) == "train" for p in train)
    assert all(split_of(p.uid) == "eval" for p in held)


def test_no_commuted_or_permuted_twin_of_an_eval_problem_is_trained_on() -> None:
    # the same problem written another way (b+a for a+b; another order of the digits to sort) shares the
    # answer: it must fall in the same split as its twin, or eval measures memorisation
    train = take(_src("arith,list", 1), 6000)
    held = take(_src("arith,list", 1, split="eval"), 600)
    train_texts = {p.text for p in train}

    def twins(p):
        if p.meta["task"] == "arith":
            a, b = p.text[:-1].split("+")
            return {f"{b}+{a}="}
        op, digits = p.text[:-1].split(":")
        return {f"sort:{''.join(q)}=" for q in itertools.permutations(digits)} if op == "sort" else set()

    leaks = [p.text for p in held if twins(p) & train_texts]
    assert not leaks, leaks[:5]
    assert sum(1 for p in held if twins(p) - {p.text}) > 100   # the check had twins to look for


def test_split_partition_covers_a_whole_small_space() -> None:
    # Every one-digit addition is in exactly one split, and the eval share is roughly the configured 10%.
    keys = [f"{a}+{b}=" for a in range(10) for b in range(10)]
    n_eval = sum(split_of(k) == "eval" for k in keys)
    assert 2 <= n_eval <= 25


@given(st.integers(0, 10**6), st.integers(0, 10**6))
@settings(max_examples=200, deadline=None)
def test_addition_solution_columns_and_answer(a: int, b: int) -> None:
    sol = addition_solution(a, b)
    steps, answer = sol.split("####")
    assert answer == str(a + b)
    cols = steps.split(",")
    assert len(cols) == max(len(str(a)), len(str(b)))
    carry = 0
    ra, rb = str(a)[::-1], str(b)[::-1]
    for i, col in enumerate(cols):
        terms, total = col.split("=")
        nums = [int(t) for t in terms.split("+")]
        x = int(ra[i]) if i < len(ra) else 0
        y = int(rb[i]) if i < len(rb) else 0
        assert nums == ([x, y, carry] if carry else [x, y])
        assert int(total) == sum(nums)
        carry = int(total) // 10


def test_difficulty_knob_and_varying_lengths() -> None:
    easy = take(_src("arith", 1), 300)
    hard = take(_src("arith", 4), 300)
    max_operand = lambda ps: max(int(x) for p in ps for x in re.findall(r"\d+", p.text))  # noqa: E731
    assert max_operand(easy) < 100 <= max_operand(hard)
    assert len({len(p.solution or "") for p in hard}) >= 10  # responses of many lengths
    lists = take(_src("list", 3), 300)
    assert len({len(p.solution or "") for p in lists}) == 5  # 2..6 items


def test_mixed_tasks_draw_both_families() -> None:
    tasks = {p.meta["task"] for p in take(_src("arith,list"), 100)}
    assert tasks == set(FAMILIES)


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(ValueError, match="arith"):
        parse_task_names("algebra")


@pytest.mark.parametrize("task", ["arith", "list"])
def test_solutions_graded_correct_and_wrong_answers_wrong(task: str) -> None:
    exact = load_grader("exact")
    numeric = load_grader("numeric")
    math_g = load_grader("math")
    for p in take(_src(task, 3), 300):
        assert p.solution is not None
        ok = Sample(p.text, p.solution, p.meta)
        assert exact(ok).reward == 1.0  # type: ignore[union-attr]
        wrong_answer = str(int(p.meta["answer"]) + 1)
        if task == "arith":
            bad = Sample(p.text, p.solution.rsplit("####", 1)[0] + "####" + wrong_answer, p.meta)
            assert numeric(ok).reward == 1.0 and numeric(bad).reward == 0.0  # type: ignore[union-attr]
            assert math_g(ok).reward == 1.0 and math_g(bad).reward == 0.0  # type: ignore[union-attr]
        else:
            bad = Sample(p.text, p.solution[::-1] if p.solution[::-1] != p.solution else p.solution + "0", p.meta)
        assert exact(bad).reward == 0.0  # type: ignore[union-attr]


def test_make_prompt_source_from_config() -> None:
    cfg = load_config(None, ["data.task=arith,list", "data.difficulty=2", "data.seed=3"])
    src = make_prompt_source(cfg, "eval")
    assert take(src, 20) == take(_src("arith,list", 2, seed=3, split="eval"), 20)
    with pytest.raises(ValueError, match="split"):
        make_prompt_source(cfg, "test")  # type: ignore[arg-type]


def test_slipped_solutions_are_consistent_and_graded_wrong() -> None:
    import random

    from minirl_async.tasks.synthetic import noisy_solution

    exact = load_grader("exact")
    rng = random.Random(0)
    prompts = take(_src("arith,list", 3), 400)
    assert all(noisy_solution(p, rng, 0.0) == p.solution for p in prompts)
    num_slipped = 0
    for p in prompts:
        sol = noisy_solution(p, rng, 0.3)
        slipped = sol != p.solution
        num_slipped += slipped
        # Slips shift the total by a sum of distinct +-10^i, never zero: a slipped solution is always wrong.
        assert exact(Sample(p.text, sol, p.meta)).reward == float(not slipped)  # type: ignore[union-attr]
        if p.meta["task"] == "arith" and slipped:
            steps, answer = sol.split("####")
            cols = [c.split("=") for c in steps.split(",")]
            # Internally consistent: the answer is what the (slipped) column sums spell, carries included.
            carry, digits = 0, []
            for terms, total in cols:
                nums = [int(t) for t in terms.split("+")]
                assert nums[2:] == ([1] if carry else [])
                digits.append(int(total) % 10)
                carry = int(total) // 10
            assert int(answer) == int(str(carry) + "".join(map(str, reversed(digits))))
    assert 60 < num_slipped < 300
