"""Benchmarks: `minirl-async bench NAME [--quick] [--json]`.

Each module `minirl_async/bench/NAME.py` defines `run(quick: bool) -> dict` returning the measured figures
(side-by-side benchmarks include a baseline measured in the same run and a `ratio`). The last stdout line
with `--json` is that dict as one JSON object.
"""

from __future__ import annotations

import argparse
import importlib
import json
import pkgutil
import sys

import minirl_async.bench as _pkg


def available() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(_pkg.__path__) if not m.name.startswith("_"))


def main(args: argparse.Namespace) -> int:
    names = available()
    if args.name not in names:
        print(f"minirl-async bench: unknown benchmark {args.name!r}; available: {', '.join(names) or 'none'}",
              file=sys.stderr)
        return 2
    figures = importlib.import_module(f"minirl_async.bench.{args.name}").run(quick=args.quick)
    if args.json:
        print(json.dumps(figures, sort_keys=True))
    else:
        width = max(len(k) for k in figures)
        for k, v in figures.items():
            print(f"{k:<{width}}  {v}")
    return 0
