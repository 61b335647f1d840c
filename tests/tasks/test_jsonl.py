"""JSONL prompt datasets: fields, chat messages, bad lines (skip with line number / fail), epochs, resume."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from minirl_async.config import load_config
from minirl_async.tasks.base import take
from minirl_async.tasks.jsonl import BadLineError, JsonlSource
from minirl_async.tasks.source import make_prompt_source

GOOD = [
    {"prompt": "1+1=", "answer": "2"},
    {"messages": [{"role": "user", "content": "2+2?"}], "answer": "4", "id": "q2"},
    {"prompt": "3+3=", "answer": "6", "solution": "6", "tests": "assert True"},
]


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_records_become_prompts_with_meta(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [json.dumps(o) for o in GOOD])
    ps = take(JsonlSource(f), 3)
    assert [p.meta["answer"] for p in ps] == ["2", "4", "6"]
    assert ps[0].text == "1+1=" and ps[0].messages is None
    assert ps[1].messages == GOOD[1]["messages"] and ps[1].uid == "q2" and "2+2?" in ps[1].text
    assert ps[2].solution == "6" and ps[2].meta["tests"] == "assert True" and "solution" not in ps[2].meta


def test_bad_lines_skipped_with_line_number(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lines = [json.dumps(GOOD[0]), "{not json", "[1, 2]", json.dumps({"answer": "x"}), "",
             json.dumps({"prompt": 5}), json.dumps({"messages": [{"role": "user"}]}), json.dumps(GOOD[2])]
    f = _write(tmp_path / "d.jsonl", lines)
    src = JsonlSource(f, "skip")
    with caplog.at_level(logging.WARNING):
        ps = take(src, 2)
    assert [p.text for p in ps] == ["1+1=", "3+3="]
    assert src.bad_lines == 5
    for n in (2, 3, 4, 6, 7):
        assert f"d.jsonl:{n}:" in caplog.text


def test_bad_line_fails_the_load_when_asked(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [json.dumps(GOOD[0]), json.dumps(GOOD[2]), "{oops"])
    src = JsonlSource(f, "fail")
    take(src, 2)
    with pytest.raises(BadLineError, match=r"d.jsonl:3: not valid JSON"):
        next(src)


def test_cycles_epochs_and_resumes_from_offset(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [json.dumps(o) for o in GOOD])
    src = JsonlSource(f)
    first = take(src, 4)
    assert first[3] == first[0] and src.epoch == 1
    state = src.state_dict()
    expected = take(src, 5)
    again = JsonlSource(f)
    again.load_state_dict(state)
    assert take(again, 5) == expected
    # a byte offset means nothing in another file: refused, not resumed mid-line
    other = _write(tmp_path / "other.jsonl", [json.dumps(o) for o in GOOD])
    with pytest.raises(ValueError, match=r"prompt cursor is at byte \d+ of .*d\.jsonl, but data\.jsonl_path is .*other"):
        JsonlSource(other).load_state_dict(state)


def test_file_without_valid_line_is_an_error(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", ["{bad", "", "[]"])
    with pytest.raises(ValueError, match="no valid line"):
        next(JsonlSource(f))


def test_config_wiring(tmp_path: Path) -> None:
    f = _write(tmp_path / "d.jsonl", [json.dumps(GOOD[0])])
    cfg = load_config(None, ["data.task=jsonl", f"data.jsonl_path={f}"])
    assert next(make_prompt_source(cfg, "train")).text == "1+1="
    with pytest.raises(ValueError, match="data.eval_jsonl_path"):
        make_prompt_source(cfg, "eval")
    with pytest.raises(ValueError, match="does not exist"):
        make_prompt_source(load_config(None, ["data.task=jsonl", "data.jsonl_path=/nonexistent.jsonl"]))
