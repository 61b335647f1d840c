"""Shared plumbing of the service entry points: config, logging, threads, readiness files, signals,
derived addresses. No model code and no protocol logic here.

Readiness: a service writes `RUN_DIR/status/<name>.ready` once its sockets are up (and, for the learner,
its first weights are published); the launcher waits for these files. Exit code EXIT_RESTART asks the
launcher to start the service again without counting a crash (a sampler whose learner rolled back).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from minirl_async.config import Config, load_config

EXIT_RESTART = 75  # EX_TEMPFAIL


class RollbackExit(Exception):
    """An engine that cannot take an older weight version in place: exit and let the launcher restart."""


def config_of(args: argparse.Namespace) -> Config:
    cfg = getattr(args, "cfg", None)
    return cfg if cfg is not None else load_config(args.config, list(args.overrides or []))


def setup_logging(name: str) -> logging.Logger:
    """Log lines to stderr (the launcher sends each service's stderr to RUN_DIR/logs/<name>.log)."""
    logging.basicConfig(level=os.environ.get("MINIRL_LOG", "INFO"), stream=sys.stderr,
                        format=f"%(asctime)s {name} %(levelname)s %(message)s", force=True)
    return logging.getLogger(f"minirl_async.{name}")


def set_threads(n: int) -> None:
    """torch threads of this process: the launcher splits the cores deliberately between services."""
    import torch

    torch.set_num_threads(max(1, n))
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set (can only be set once per process)
        pass


def status_dir(cfg: Config) -> Path:
    d = Path(cfg.run.dir) / "status"
    d.mkdir(parents=True, exist_ok=True)
    return d


def mark_ready(cfg: Config, name: str) -> None:
    (status_dir(cfg) / f"{name}.ready").write_text(str(os.getpid()))


def nth_addr(addr: str, i: int) -> str:
    """The i-th address of a family of sockets: tcp port + i, or an ipc path with '-i' (i = 0: unchanged).

    Several graders cannot bind one PULL address, so grader i binds nth_addr(rollout_addr, i) and samplers
    connect their PUSH to all of them (zmq round-robins whole messages across connected peers).
    """
    if i == 0:
        return addr
    if addr.startswith("tcp://"):
        host, _, port = addr[len("tcp://"):].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"address {addr!r} has no numeric port; give tcp://HOST:PORT")
        return f"tcp://{host}:{int(port) + i}"
    return f"{addr}-{i}"


def rollout_addrs(cfg: Config) -> list[str]:
    return [nth_addr(cfg.network.rollout_addr, i) for i in range(cfg.grader.num_graders)]


STOP_SIGNAL: dict[str, int] = {"signum": 0}
"""The signal that set a service's stop event (0: none), for its exit code: 128 + signum."""


def stop_code() -> int:
    """A service's exit code once stopped: 0 when the learner told it to stop (the run is done), 128 + signum
    when a signal did (the launcher then restarts it: the run goes on)."""
    return 128 + STOP_SIGNAL["signum"] if STOP_SIGNAL["signum"] else 0


def install_stop_handlers(stop: asyncio.Event) -> None:
    """SIGTERM / SIGINT set `stop` so the service shuts down in order (close sockets, flush logs); the signal
    is kept in STOP_SIGNAL."""
    loop = asyncio.get_running_loop()
    STOP_SIGNAL["signum"] = 0

    def on(sig: int) -> None:
        STOP_SIGNAL["signum"] = sig
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on, sig)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass


def sanity_errors(cfg: Config) -> list[str]:
    """What makes a config unrunnable as a pipeline, each with what to change (empty: fine)."""
    errors: list[str] = []
    net = cfg.network
    try:
        addrs = {"network.work_addr": net.work_addr, "network.weights_addr": net.weights_addr,
                 "network.scored_addr": net.scored_addr}
        for i, a in enumerate(rollout_addrs(cfg)):
            addrs[f"rollout address of grader {i} (network.rollout_addr + {i})"] = a
    except ValueError as e:
        return [str(e)]
    seen: dict[str, str] = {}
    for key, a in addrs.items():
        if a in seen:
            errors.append(f"{key} and {seen[a]} are both {a!r}: with grader.num_graders = "
                          f"{cfg.grader.num_graders}, grader i binds network.rollout_addr's port + i; move "
                          f"network.rollout_addr so that range is free")
        seen[a] = key
        if a.startswith("ipc://") and len(a) - len("ipc://") > 100:
            errors.append(f"{key} = {a!r}: ipc paths must be under ~100 characters; use a shorter run.dir "
                          f"or a tcp:// address")
    if cfg.sampler.max_batch_size // cfg.algo.group_size < 1:
        errors.append(f"sampler.max_batch_size ({cfg.sampler.max_batch_size}) holds no whole group of "
                      f"algo.group_size = {cfg.algo.group_size}: no group can ever be admitted")
    if cfg.staleness.lease_s <= cfg.run.fake_step_s and cfg.run.fake_compute:
        errors.append("staleness.lease_s must exceed run.fake_step_s, or every group expires before it returns")
    return errors


def start_curve_auth(ctx: Any, net: Any) -> Any:
    """For a process that binds: with CurveZMQ configured, a ZAP authenticator that admits only the client
    public keys in `network.curve_allowed_clients` (any holder of the server key when that is empty).
    Returns it (call `.stop()` at shutdown) or None without CURVE."""
    if not net.curve_server_key:
        return None
    from minirl_async.proto.sockets import start_authenticator

    return start_authenticator(ctx, net.curve_allowed_clients or None)
