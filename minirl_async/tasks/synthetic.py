"""Synthetic verifiable tasks: seeded, reproducible, with a difficulty knob and disjoint train/eval splits.

Families (choose with `data.task`, several joined by commas mix them evenly, e.g. "arith,list"):
- `arith`: addition of two numbers with up to `difficulty + 1` digits each (digit counts drawn independently,
  so responses have varying length). The worked solution adds column by column from the right, writing the
  carry explicitly, then the answer after "####":   prompt "347+85="   solution "7+5=12,4+8+1=13,3+0+1=4####432"
  Accuracy is limited by carrying and by copying the column digits back in order: skills RL sharpens.
- `list`: sort or reverse a list of `2 .. difficulty + 3` digits:   prompt "sort:528="   solution "258"

Every problem belongs to one split by a hash of its canonical uid (`base.split_of`), so train and eval never
overlap, not even by a commuted sum (`a+b` / `b+a`) or a permuted list to sort, which share a uid. Prompt i of a stream is drawn from `random.Random(f"{seed}:{split}:{i}")`: the stream is a pure
function of (seed, split, i) and its cursor is just `i`.

    python -m minirl_async.tasks.synthetic arith 2      # print a few train prompts and solutions
"""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from typing import Any, Protocol

from minirl_async.tasks.base import Prompt, Split, split_of

ANSWER_PREFIX = "####"
"""Marks the final answer in worked solutions; the `exact` grader reads what follows its last occurrence."""


class TaskFamily(Protocol):
    name: str

    def generate(self, rng: random.Random, difficulty: int) -> Prompt: ...


def _number(rng: random.Random, max_digits: int) -> int:
    digits = rng.randint(1, max_digits)
    return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)


def addition_solution(a: int, b: int) -> str:
    """Column-by-column worked solution of a + b, least significant column first, ending '####<a+b>'."""
    ra, rb = str(a)[::-1], str(b)[::-1]
    steps, carry = [], 0
    for i in range(max(len(ra), len(rb))):
        x = int(ra[i]) if i < len(ra) else 0
        y = int(rb[i]) if i < len(rb) else 0
        s = x + y + carry
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        carry = s // 10
    return ",".join(steps) + ANSWER_PREFIX + str(a + b)


def noisy_addition_solution(a: int, b: int, rng: random.Random, slip: float) -> str:
    """A worked solution with slips: each column sum is off by one with probability `slip`, and the rest of
    the solution (carries, final answer) follows the slipped value consistently, as a careless human's
    would. SFT on these emulates imperfect demonstrations: the model learns the slip rate (sampling at
    temperature 1 reproduces it, greedy mostly avoids it) and RL can remove it."""
    ra, rb = str(a)[::-1], str(b)[::-1]
    steps, carry, digits = [], 0, []
    for i in range(max(len(ra), len(rb))):
        x = int(ra[i]) if i < len(ra) else 0
        y = int(rb[i]) if i < len(rb) else 0
        s = x + y + carry
        if rng.random() < slip:
            s = s + 1 if s == 0 or (s < 19 and rng.random() < 0.5) else s - 1
        steps.append(f"{x}+{y}+{carry}={s}" if carry else f"{x}+{y}={s}")
        digits.append(s % 10)
        carry = s // 10
    answer = (str(carry) if carry else "") + "".join(str(d) for d in reversed(digits))
    return ",".join(steps) + ANSWER_PREFIX + str(int(answer))


def noisy_solution(prompt: Prompt, rng: random.Random, slip: float) -> str:
    """The SFT target of `prompt` with slips (arith: see `noisy_addition_solution`; list: two adjacent
    items swapped with probability `slip`); the clean solution when `slip` is 0 or the task has no slips."""
    assert prompt.solution is not None
    if slip <= 0:
        return prompt.solution
    task = prompt.meta.get("task")
    if task == "arith":
        a, b = (int(x) for x in prompt.text.rstrip("=").split("+"))
        return noisy_addition_solution(a, b, rng, slip)
    if task == "list" and len(prompt.solution) > 1 and rng.random() < slip:
        i = rng.randrange(len(prompt.solution) - 1)
        sol = prompt.solution
        return sol[:i] + sol[i + 1] + sol[i] + sol[i + 2:]
    return prompt.solution


class Arith:
    name = "arith"

    def generate(self, rng: random.Random, difficulty: int) -> Prompt:
        a, b = _number(rng, difficulty + 1), _number(rng, difficulty + 1)
        text = f"{a}+{b}="
        # uid (and so the split) up to commutativity: "85+347=" and "347+85=" are one problem, never split
        return Prompt(text=text, meta={"answer": str(a + b), "task": self.name}, solution=addition_solution(a, b),
                      uid=f"{min(a, b)}+{max(a, b)}=")


class ListOps:
    name = "list"

    def generate(self, rng: random.Random, difficulty: int) -> Prompt:
        items = [str(rng.randint(0, 9)) for _ in range(rng.randint(2, difficulty + 3))]
        op = rng.choice(("sort", "rev"))
        answer = "".join(sorted(items) if op == "sort" else items[::-1])
        text = f"{op}:{''.join(items)}="
        # sorting any permutation of the same digits is one problem (same answer): one uid, one split
        uid = f"sort:{answer}=" if op == "sort" else text
        return Prompt(text=text, meta={"answer": answer, "task": self.name}, solution=answer, uid=uid)


FAMILIES: dict[str, TaskFamily] = {"arith": Arith(), "list": ListOps()}


def parse_task_names(task: str) -> list[TaskFamily]:
    """'arith' or 'arith,list' -> families; a clear error names the valid ones."""
    names = [t.strip() for t in task.split(",") if t.strip()]
    unknown = [n for n in names if n not in FAMILIES]
    if not names or unknown:
        raise ValueError(
            f"data.task = {task!r}: unknown task {unknown or task!r}; choose from {sorted(FAMILIES)} "
            "(comma-separated to mix) or 'jsonl'"
        )
    return [FAMILIES[n] for n in names]


class SyntheticSource:
    """Endless deterministic prompt stream of one split; `state_dict()` is the cursor."""

    def __init__(self, families: list[TaskFamily], difficulty: int, seed: int = 0, split: Split = "train"):
        if difficulty < 1:
            raise ValueError(f"data.difficulty must be >= 1 (got {difficulty})")
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval' (got {split!r})")
        self.families, self.difficulty, self.seed, self.split = families, difficulty, seed, split
        self.index = 0

    def prompt_at(self, i: int) -> Prompt:
        """The i-th prompt of this stream (pure function of seed, split, i)."""
        rng = random.Random(f"{self.seed}:{self.split}:{i}")
        family = self.families[rng.randrange(len(self.families))]
        # Rejection: redraw until the problem falls in our split (about 1 draw in 10 for eval).
        for _ in range(10_000):
            p = family.generate(rng, self.difficulty)
            if split_of(p.uid) == self.split:
                return p
        raise ValueError(
            f"task {family.name!r} at difficulty {self.difficulty} has too few {self.split} problems; "
            "raise data.difficulty"
        )

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        p = self.prompt_at(self.index)
        self.index += 1
        return p

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "synthetic", "seed": self.seed, "split": self.split, "index": self.index,
                "tasks": [f.name for f in self.families], "difficulty": self.difficulty}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "synthetic" or state.get("seed") != self.seed or state.get("split") != self.split:
            raise ValueError(
                f"prompt-source state {state!r} does not belong to this synthetic stream "
                f"(seed={self.seed}, split={self.split}); was data.seed or data.task changed?"
            )
        # The cursor indexes a stream that depends on the families and difficulty too: resuming it under
        # other ones would silently draw different prompts. (States saved before these keys existed pass.)
        tasks, mine = state.get("tasks"), [f.name for f in self.families]
        if ("tasks" in state and list(tasks or []) != mine) or \
                ("difficulty" in state and state["difficulty"] != self.difficulty):
            raise ValueError(
                f"prompt-source state was saved with data.task = {','.join(tasks or [])!r}, "
                f"data.difficulty = {state.get('difficulty')} but this run has data.task = {','.join(mine)!r}, "
                f"data.difficulty = {self.difficulty}; restore those settings to resume, or start a fresh run"
            )
        self.index = int(state["index"])

if __name__ == "__main__":
    src = SyntheticSource(parse_task_names(sys.argv[1] if len(sys.argv) > 1 else "arith"),
                          int(sys.argv[2]) if len(sys.argv) > 2 else 2)
    for _ in range(8):
        p = next(src)
        print(f"{p.text:<16} {p.solution}")
