"""The prompt record, the prompt-source interface and the train/eval partition shared by every task.

A `Prompt` is what the controller hands to samplers: the text (or chat messages), the metadata its grader
needs (`meta["answer"]`, tests, ...) and, for synthetic tasks, the worked solution used by cold-start SFT.
A prompt source is an endless, deterministic iterator whose position can be saved and restored (the learner
checkpoints it so a restarted run resumes the same stream):

    src = make_prompt_source(cfg, "train")      # minirl_async.tasks.source
    p = next(src); state = src.state_dict(); ...; src.load_state_dict(state)
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

Split = Literal["train", "eval"]

# Fraction of the problem space (per thousand) that belongs to the held-out split. The partition is a hash of
# the problem itself, so no train prompt can ever equal an eval prompt, whatever the seeds.
EVAL_PERMILLE = 100


@dataclass(frozen=True)
class Prompt:
    """One prompt: what the policy sees and what its grader needs."""

    text: str
    """Prompt text (for chat datasets: the rendered conversation, filled in by the tokenizer's template)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Grader metadata, e.g. {"answer": "42", "task": "arith"}; travels with the group to the grader."""
    solution: str | None = None
    """Worked solution ending in the answer (synthetic tasks): the cold-start SFT target."""
    messages: list[dict[str, str]] | None = None
    """Chat messages when the dataset gives them instead of a plain prompt."""
    uid: str = ""
    """Stable identifier of the problem (the same problem always has the same uid)."""


@runtime_checkable
class PromptSource(Protocol):
    """An endless deterministic stream of prompts with a saveable cursor."""

    def __iter__(self) -> Iterator[Prompt]: ...

    def __next__(self) -> Prompt: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def split_of(key: str, eval_permille: int = EVAL_PERMILLE) -> Split:
    """Which split a problem belongs to, from a hash of its canonical key (stable across runs and machines)."""
    h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
    return "eval" if h % 1000 < eval_permille else "train"


def take(source: PromptSource, n: int) -> list[Prompt]:
    """The next `n` prompts of a source (advances it)."""
    return [next(source) for _ in range(n)]
