"""The `minirl-async` command. Heavy imports (torch, zmq) are deferred so `--help` answers instantly.

    minirl-async run [-c CONFIG] [key=value ...]        whole pipeline on this machine
    minirl-async learner|sampler|grader -c CONFIG ...    one service
    minirl-async sft | eval | report RUN_DIR | bench NAME [--quick] [--json] | keys DIR
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

# subcommand -> "module:function"; each function takes the parsed argparse.Namespace and returns an exit code.
COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("minirl_async.services.launch:main", "start learner, samplers and graders locally and supervise them"),
    "learner": ("minirl_async.services.learner:main", "run the learner service (rank 0 is the hub; torchrun-able)"),
    "sampler": ("minirl_async.services.sampler:main", "run one sampler service"),
    "grader": ("minirl_async.services.grader:main", "run one grader service"),
    "sft": ("minirl_async.tasks.sft:main", "cold-start supervised fine-tuning on worked solutions"),
    "eval": ("minirl_async.tasks.evaluate:main", "held-out accuracy of a checkpoint"),
    "report": ("minirl_async.report:main", "regenerate plots and summary.md of a run directory"),
    "bench": ("minirl_async.bench:main", "run a benchmark: sampler, learner, weightsync, codec, overlap"),
    "keys": ("minirl_async.proto.keys:main", "write a CurveZMQ key pair"),
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", default=None, help="TOML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", metavar="key.sub=value", help="config overrides")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="minirl-async",
        description="Asynchronous streaming RL (MiniRL) for MoE LLMs: FP8 sampler, graders, FSDP2 learner over ZeroMQ.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name in ("run", "learner", "sampler", "grader", "sft", "eval"):
            _add_config_args(p)
        if name == "sampler":
            p.add_argument("--index", type=int, default=0, help="sampler index (for its id and seed)")
        if name == "grader":
            p.add_argument("--index", type=int, default=0, help="grader index")
        if name == "eval":
            p.add_argument("--checkpoint", required=True, help="HF-format checkpoint folder")
            p.add_argument("--json", action="store_true", help="print only the JSON line")
        if name == "sft":
            p.add_argument("--out", default=None, help="output checkpoint folder (default: RUN_DIR/sft)")
        if name == "report":
            p.add_argument("run_dir", help="run directory with metrics.jsonl")
        if name == "bench":
            p.add_argument("name", help="benchmark name: sampler, learner, weightsync, codec, overlap")
            p.add_argument("--quick", action="store_true", help="smaller sizes (seconds, for smoke tests)")
            p.add_argument("--json", action="store_true", help="print the figures as one JSON line last")
        if name == "keys":
            p.add_argument("out_dir", help="folder for NAME.key / NAME.key_secret")
            p.add_argument("--name", default="minirl", help="key pair name")
    return parser


def _resolve(target: str) -> Callable[[argparse.Namespace], int]:
    module_name, func_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and (e.name == module_name or module_name.startswith(e.name + ".")):
            raise SystemExit(f"minirl-async: '{module_name}' is not yet available in this version") from None
        raise
    return getattr(module, func_name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from minirl_async.config import ConfigError, load_config

    try:
        if hasattr(args, "overrides"):
            # Validate before starting anything; commands may use args.cfg or load again themselves.
            args.cfg = load_config(args.config, args.overrides)
        return int(_resolve(COMMANDS[args.command][0])(args) or 0)
    except ConfigError as e:
        print(f"minirl-async: config error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
