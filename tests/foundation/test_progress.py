"""Progress bars in a log file: one line per refresh, no carriage returns, the final state last."""

from __future__ import annotations

from minirl_async.progress import progress_bar


def test_log_output_is_one_line_per_refresh(capsys):
    bar = progress_bar(range(5), desc="sft", log_interval_s=0.0)   # stderr is captured: not a terminal
    for i in bar:
        bar.set_postfix(loss=f"{1.0 / (i + 1):.3f}")
    bar.close()
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and err.endswith("\n")
    assert len(lines) >= 5 and all(line.startswith("sft:") for line in lines)
    assert "5/5" in lines[-1] and "loss=0.200" in lines[-1]


def test_disabled_bar_writes_nothing(capsys):
    for _ in progress_bar(range(3), desc="rl", enabled=False):
        pass
    assert capsys.readouterr().err == ""
