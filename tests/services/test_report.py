"""Report: plots and summary.md from a synthetic metrics.jsonl, through the real `minirl-async report` CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from minirl_async.report import lag_histogram, read_metrics, write_report


def _rows(n=6):
    return [{"step": i, "reward/mean": 0.1 * i, "reward/acc": 0.1 * i, "kl/train_infer_k1": 0.01,
             "kl/train_infer_k3": 0.002 * i, "kl/staleness_k3": 0.001, "policy/entropy": 1.0 - 0.1 * i,
             "staleness/lag_updates_mean": 0.5, "staleness/lag_updates_max": i % 3,
             "staleness/lag_updates_hist": [2, 1, 1][: i % 3 + 1], "replay/mode": 2 if i < 3 else 3,
             "perf/step_s": 1.0, "perf/sample_tok_s": 100.0, "perf/train_tok_s": 200.0,
             "pipeline/lost": 0, "pipeline/duplicates": 1} for i in range(n)]


def test_report_writes_plots_and_summary(tmp_path):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for r in _rows():
            f.write(json.dumps(r) + "\n")
        f.write('{"step": 6, "reward/me')  # torn last line of a crashed writer is ignored
    (tmp_path / "eval.json").write_text(json.dumps({"cold_start": 0.2, "final": 0.5}))
    out = subprocess.run([sys.executable, "-m", "minirl_async.cli", "report", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rep = tmp_path / "report"
    for name in ["reward.png", "kl.png", "entropy.png", "staleness_hist.png", "replay_mode.png",
                 "throughput.png", "summary.md"]:
        assert (rep / name).is_file() and (rep / name).stat().st_size > 0, name
    assert (rep / "reward.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = (rep / "summary.md").read_text()
    assert "Steps logged: 6" in summary and "| final | 0.5 |" in summary
    assert "| reward/mean | 0 | 0.5 |" in summary  # first and last value of the series
    assert "R2: 3, R3: 3" in summary and "| pipeline/lost | 0 |" in summary


def test_lag_histogram_sums_steps(tmp_path):
    rows = _rows()
    # i % 3 = 0,1,2,0,1,2 -> hist prefixes [2], [2,1], [2,1,1] twice each
    assert lag_histogram(rows) == [12, 4, 2]


def test_bad_middle_line_is_an_error(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\nnot json\n{"step": 1}\n')
    try:
        read_metrics(p)
    except ValueError as e:
        assert "metrics.jsonl:2" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_missing_metrics_is_a_clear_error(tmp_path):
    try:
        write_report(tmp_path)
    except ValueError as e:
        assert "metrics.jsonl" in str(e)
    else:
        raise AssertionError("expected ValueError")


def test_steps_redone_after_a_restart_keep_their_last_record(tmp_path):
    # steps 0-3, a learner restart from the checkpoint of version 2, steps 2-3 again (other rewards)
    rows = _rows(4) + [{**r, "reward/mean": 9.0} for r in _rows(4)[2:]]
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = read_metrics(p)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    assert [r["reward/mean"] for r in got] == [0.0, 0.1, 9.0, 9.0]
    assert lag_histogram(got) == lag_histogram(_rows(4))   # the abandoned steps' samples are not counted


def test_run_log_cuts_a_torn_line_before_appending(tmp_path):
    from minirl_async.services.learner import RunLog

    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 0}\n{"step": 1, "rew')   # the previous learner died mid-write
    log = RunLog(tmp_path)
    log.step({"step": 1})
    log.close()
    assert p.read_text() == '{"step": 0}\n{"step": 1}\n' and [r["step"] for r in read_metrics(p)] == [0, 1]
