"""JSONL prompt datasets: one JSON object per line, streamed (never loaded whole), cycled forever.

Each line holds `prompt` (a string) or `messages` (a chat: list of {"role", "content"}), plus any grader
metadata (`answer`, `tests`, ...); everything except prompt/messages/solution becomes `Prompt.meta`.
An optional `solution` string is the SFT target. Blank lines are ignored. A malformed line is reported
with its file and line number and either skipped (counted in `bad_lines`) or raises, per
`data.bad_line_policy`. The cursor is (epoch, byte offset, line number), so resuming seeks directly.

    src = JsonlSource("prompts.jsonl", bad_line_policy="skip")
    p = next(src); src.state_dict()  # {"kind": "jsonl", "epoch": 0, "offset": 57, "line": 1, ...}
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal

from minirl_async.tasks.base import Prompt

log = logging.getLogger(__name__)


class BadLineError(ValueError):
    """A JSONL line that is not a valid prompt record; the message names the file and line."""


def parse_line(raw: bytes, where: str) -> Prompt | None:
    """One line -> Prompt (None for a blank line). Raises BadLineError saying what is wrong."""
    text = raw.strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadLineError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise BadLineError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    prompt, messages = obj.get("prompt"), obj.get("messages")
    if prompt is None and messages is None:
        raise BadLineError(f"{where}: needs a 'prompt' string or a 'messages' list (keys: {sorted(obj)})")
    if prompt is not None and not isinstance(prompt, str):
        raise BadLineError(f"{where}: 'prompt' must be a string, got {type(prompt).__name__}")
    if messages is not None:
        ok = isinstance(messages, list) and messages and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in messages
        )
        if not ok:
            raise BadLineError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
    solution = obj.get("solution")
    if solution is not None and not isinstance(solution, str):
        raise BadLineError(f"{where}: 'solution' must be a string")
    meta = {k: v for k, v in obj.items() if k not in ("prompt", "messages", "solution")}
    if prompt is None:
        # Plain-text fallback; the tokenizer's chat template (when any) renders `messages` for the model.
        prompt = "\n".join(f"{m['role']}: {m['content']}" for m in messages or []) + "\nassistant: "
    uid = str(obj.get("id", prompt))
    return Prompt(text=prompt, meta=meta, solution=solution, messages=messages, uid=uid)


class JsonlSource:
    """Endless stream over a JSONL file (epoch after epoch), resumable from its byte offset."""

    def __init__(self, path: str | Path, bad_line_policy: Literal["skip", "fail"] = "skip", cycle: bool = True):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"prompt dataset {str(self.path)!r} does not exist; set data.jsonl_path")
        if bad_line_policy not in ("skip", "fail"):
            raise ValueError(f"data.bad_line_policy must be 'skip' or 'fail' (got {bad_line_policy!r})")
        self.policy, self.cycle = bad_line_policy, cycle
        self.epoch, self.offset, self.line = 0, 0, 0
        self.bad_lines = 0
        self._good_in_epoch = 0
        self._fh: BinaryIO | None = None

    def _open(self) -> BinaryIO:
        if self._fh is None:
            self._fh = self.path.open("rb")
            self._fh.seek(self.offset)
        return self._fh

    def __iter__(self) -> Iterator[Prompt]:
        return self

    def __next__(self) -> Prompt:
        fh = self._open()
        while True:
            raw = fh.readline()
            if not raw:  # end of file: next epoch (or stop), but never spin on a file without a good line
                if not self.cycle:
                    raise StopIteration
                if self._good_in_epoch == 0:
                    raise ValueError(f"prompt dataset {str(self.path)!r} has no valid line")
                self.epoch, self.offset, self.line, self._good_in_epoch = self.epoch + 1, 0, 0, 0
                fh.seek(0)
                continue
            self.offset += len(raw)
            self.line += 1
            try:
                p = parse_line(raw, f"{self.path}:{self.line}")
            except BadLineError as e:
                if self.policy == "fail":
                    raise
                self.bad_lines += 1
                log.warning("skipping bad prompt line: %s", e)
                continue
            if p is not None:
                self._good_in_epoch += 1
                return p

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "jsonl", "path": str(self.path), "epoch": self.epoch, "offset": self.offset,
                "line": self.line, "bad_lines": self.bad_lines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "jsonl":
            raise ValueError(f"prompt-source state {state!r} is not a JSONL cursor; was data.task changed?")
        saved = Path(str(state.get("path", self.path)))
        same = saved == self.path or (saved.exists() and os.path.samefile(saved, self.path))
        if not same or int(state["offset"]) > self.path.stat().st_size:
            # a byte offset means nothing in another file: it would resume mid-line, somewhere
            raise ValueError(f"the checkpoint's prompt cursor is at byte {state['offset']} of {saved}, but "
                             f"data.jsonl_path is {self.path}{'' if not same else ' (now shorter)'}: resume with "
                             "the same file, or start afresh (learner.resume = false)")
        self.epoch, self.offset, self.line = int(state["epoch"]), int(state["offset"]), int(state["line"])
        self.bad_lines = int(state.get("bad_lines", 0))
        # A resumed epoch may start mid-file: count it as having had good lines (it did, before the cut).
        self._good_in_epoch = 1 if self.offset > 0 else 0
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
