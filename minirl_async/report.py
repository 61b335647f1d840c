"""The run report: PNG plots and `summary.md` from a run directory's `metrics.jsonl` (ALGORITHM.md section 7
names), written to `RUN_DIR/report/`.

    minirl-async report runs/tiny            # or: python -m minirl_async.report runs/tiny

Plots: reward and accuracy, train-inference KL (and the staleness KL), policy entropy, histogram of the
measured lag in optimizer updates (summed over steps), the routing replay mode over time, throughput.
A metric missing from the file is simply left out of its plot. Eval results, when the launcher wrote
`eval.json` (cold start and final), are added to the summary.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

REPORT_DIR = "report"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """One dict per step, in step order; a torn last line (a crash mid-write) is ignored, other bad lines
    are errors. A step logged twice (redone after a learner restart from an older checkpoint) keeps its
    last record: the one the final model descends from."""
    rows: list[dict[str, Any]] = []
    lines = Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e}); fix or remove that line") from e
    by_step = {r.get("step", i): r for i, r in enumerate(rows)}
    return [by_step[k] for k in sorted(by_step)]


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(float(r.get("step", i)))
            ys.append(float(v))
    return xs, ys


def lag_histogram(rows: list[dict[str, Any]]) -> list[int]:
    """Sum of the per-step `staleness/lag_updates_hist` count lists."""
    total: list[int] = []
    for r in rows:
        h = r.get("staleness/lag_updates_hist") or []
        if len(h) > len(total):
            total.extend([0] * (len(h) - len(total)))
        for i, c in enumerate(h):
            total[i] += int(c)
    return total


def _line_plot(plt: Any, rows: list[dict[str, Any]], keys: list[str], title: str, out: Path,
               ylabel: str = "", step_plot: bool = False) -> bool:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    drawn = False
    for key in keys:
        xs, ys = _series(rows, key)
        if xs:
            (ax.step if step_plot else ax.plot)(xs, ys, label=key, **({"where": "post"} if step_plot else {}))
            drawn = True
    if drawn:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out, dpi=100)
    plt.close(fig)
    return drawn


def write_plots(rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """Write the PNGs; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")  # no display: runs on servers and in tests
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    specs = [
        ("reward.png", ["reward/mean", "reward/acc"], "Reward and accuracy", "", False),
        ("kl.png", ["kl/train_infer_k1", "kl/train_infer_k3", "kl/staleness_k3"], "KL divergences", "nats", False),
        ("entropy.png", ["policy/entropy"], "Policy entropy (pi_prox)", "nats", False),
        ("replay_mode.png", ["replay/mode", "staleness/lag_updates_max"], "Replay mode (0 none, 2 R2, 3 R3)",
         "", True),
        ("throughput.png", ["perf/sample_tok_s", "perf/train_tok_s"], "Throughput", "tokens/s", False),
        ("step_time.png", ["perf/step_s", "perf/weight_sync_s"], "Step and weight-sync time", "s", False),
    ]
    for name, keys, title, ylabel, step_plot in specs:
        if _line_plot(plt, rows, keys, title, out_dir / name, ylabel, step_plot):
            written.append(name)
    hist = lag_histogram(rows)
    if hist:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.bar(range(len(hist)), hist)
        ax.set_title("Measured lag of trained samples (optimizer updates)")
        ax.set_xlabel("lag_updates = (v - b) * N + k")
        ax.set_ylabel("samples")
        fig.tight_layout()
        fig.savefig(out_dir / "staleness_hist.png", dpi=100)
        plt.close(fig)
        written.append("staleness_hist.png")
    return written


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(rows: list[dict[str, Any]], plots: list[str], eval_result: dict[str, Any] | None) -> str:
    lines = ["# Run summary", ""]
    if not rows:
        return "\n".join(lines + ["metrics.jsonl has no steps yet."]) + "\n"
    last = rows[-1]
    lines += [f"Steps logged: {len(rows)} (last step {last.get('step', len(rows) - 1)}).", ""]
    if eval_result:
        lines += ["## Eval accuracy", "", "| checkpoint | accuracy |", "|---|---|"]
        for k, v in eval_result.items():
            lines.append(f"| {k} | {_fmt(v)} |")
        lines.append("")
    keys = ["reward/mean", "reward/acc", "kl/train_infer_k3", "kl/staleness_k3", "policy/entropy",
            "loss/clip_frac", "is/trunc_frac", "routing/agree_frac", "staleness/lag_updates_mean",
            "staleness/lag_updates_max", "staleness/version_lag_max", "perf/step_s", "perf/sample_tok_s",
            "perf/train_tok_s"]
    lines += ["## Metrics", "", "| metric | first | last | mean | min | max |", "|---|---|---|---|---|---|"]
    for k in keys:
        _, ys = _series(rows, k)
        if ys:
            lines.append(f"| {k} | {_fmt(ys[0])} | {_fmt(ys[-1])} | {_fmt(sum(ys) / len(ys))} | "
                         f"{_fmt(min(ys))} | {_fmt(max(ys))} |")
    modes = [int(r["replay/mode"]) for r in rows if "replay/mode" in r]
    if modes:
        names = {0: "none", 2: "R2", 3: "R3"}
        counts = {names.get(int(m), str(m)): modes.count(m) for m in sorted(set(modes))}
        lines += ["", "Replay mode steps: " + ", ".join(f"{k}: {v}" for k, v in counts.items()) + "."]
    pipe = {k: v for k, v in last.items() if k.startswith("pipeline/")}
    if pipe:
        lines += ["", "## Pipeline ledger (end of run)", "", "| counter | value |", "|---|---|"]
        lines += [f"| {k} | {_fmt(v)} |" for k, v in sorted(pipe.items())]
    if plots:
        lines += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write RUN_DIR/report/*.png and summary.md; returns the report folder."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ValueError(f"{metrics} does not exist: give the run directory of a run that logged steps")
    rows = read_metrics(metrics)
    out = run / REPORT_DIR
    plots = write_plots(rows, out) if rows else []
    eval_path = run / "eval.json"
    eval_result = json.loads(eval_path.read_text()) if eval_path.is_file() else None
    (out / "summary.md").parent.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(summary_markdown(rows, plots, eval_result))
    return out


def main(args: argparse.Namespace) -> int:
    try:
        out = write_report(args.run_dir)
    except ValueError as e:
        print(f"minirl-async report: {e}", file=sys.stderr)
        return 2
    print(f"report written to {out}")
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir")
    raise SystemExit(main(p.parse_args()))
