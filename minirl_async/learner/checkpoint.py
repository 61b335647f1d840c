"""Learner checkpoints: atomic, keep-last-K, bit-exact resume; and HF-format export.

A checkpoint is a folder `ROOT/step_{version:08d}/` with
    model.pt      full (unsharded) model state dict, fp32 master weights
    optim.pt      full AdamW state (moments, step counts) in the same naming
    trainer.pt    scheduler state, version, skipped-update count, the RNG states (torch CPU/CUDA, python,
                  numpy) of EVERY rank (gathered to rank 0; each rank restores its own), and `extra`: an
                  opaque dict the caller owns (the controller's ledger, dataset cursor...)

Atomicity: everything is written into `ROOT/.tmp-step_X-<pid>/`, fsynced (files, then the folder), and
renamed to `step_X` with `os.replace` (then ROOT is fsynced), so a crash or power loss mid-write leaves at
worst a `.tmp-*` folder (removed by the next save) and the last good checkpoint untouched; readers only ever
see complete `step_*` folders. Saving a version that exists moves the old folder to `.tmp-old-step_X-<pid>`
first; a crash between the two renames leaves that one, and the next save puts it back as `step_X`. After a
save only the newest `keep_last` checkpoints remain. `load_latest` reads all three files before applying any
and falls back to the next older checkpoint (with a warning) when the newest cannot be read.

FSDP: every rank must call `save_checkpoint` / `load_latest` (gathering the full state is a collective);
rank 0 writes; every rank reads, so ROOT must be on a filesystem all learner ranks can see. Loading into a
different world size works (the state is unsharded); rank r restores RNG state r, or rank 0's when the
checkpoint had fewer ranks (resume is then not bit-exact, which a new world size is not anyway).

    path = save_checkpoint(trainer, run_dir / "checkpoints", extra={"controller": ctl.state_dict()}, keep_last=2)
    extra = load_latest(trainer, run_dir / "checkpoints")   # None when there is no checkpoint
    export_hf(trainer, "export/")                             # config.json + model.safetensors
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

if TYPE_CHECKING:
    from minirl_async.learner.trainer import Trainer

log = logging.getLogger(__name__)

PREFIX = "step_"


def _barrier(trainer: Trainer) -> None:
    if trainer.world > 1:
        dist.barrier()


def _rng_state() -> dict[str, Any]:
    return {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(s: dict[str, Any]) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if s.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _fsync(path: Path) -> None:
    """Flush a file's or a folder's contents (a folder: its entries, i.e. renames) to stable storage."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _recover(root: Path) -> None:
    """Put back `.tmp-old-step_X-<pid>` as `step_X` when `step_X` is missing: a save of an existing version
    moved the old (complete) folder aside and crashed before its replacement landed."""
    for old in root.glob(".tmp-old-*"):
        done = root / old.name.removeprefix(".tmp-old-").rsplit("-", 1)[0]
        if not done.exists():
            try:
                os.replace(old, done)
            except OSError:   # another rank put it back first
                pass


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    r = Path(root)
    if not r.is_dir():
        return []
    return sorted(p for p in r.iterdir() if p.is_dir() and p.name.startswith(PREFIX))


def save_checkpoint(trainer: Trainer, root: str | Path, extra: dict[str, Any], keep_last: int = 2,
                    _fail_after: str | None = None) -> Path | None:
    """Write checkpoint `root/step_{trainer.version:08d}` atomically; returns its path on rank 0 (None on the
    other ranks). `_fail_after` (tests only) raises after writing the named file, to simulate a crash."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(trainer.policy, options=opts)
    rng_states: list[Any] = [None] * trainer.world if trainer.rank == 0 else []
    if trainer.world > 1:
        dist.gather_object(_rng_state(), rng_states if trainer.rank == 0 else None, dst=0)
    else:
        rng_states = [_rng_state()]
    optim_sd = get_optimizer_state_dict(trainer.policy, trainer.optimizer, options=opts)
    path: Path | None = None
    if trainer.rank == 0:
        r = Path(root)
        r.mkdir(parents=True, exist_ok=True)
        _recover(r)
        for stale in r.glob(".tmp-*"):   # left by a crashed save
            shutil.rmtree(stale, ignore_errors=True)
        final = r / f"{PREFIX}{trainer.version:08d}"
        tmp = r / f".tmp-{final.name}-{os.getpid()}"
        tmp.mkdir()
        meta = {"version": trainer.version, "skipped_updates": trainer.skipped_updates,
                "scheduler": trainer.scheduler.state_dict(), "rng": rng_states, "extra": extra}
        for name, obj in (("model.pt", model_sd), ("optim.pt", optim_sd), ("trainer.pt", meta)):
            torch.save(obj, tmp / name)
            _fsync(tmp / name)
            if _fail_after == name:
                raise RuntimeError(f"simulated crash after writing {name}")
        _fsync(tmp)
        if final.exists():   # saving the same version again: move the old one aside first
            old = r / f".tmp-old-{final.name}-{os.getpid()}"
            os.replace(final, old)
            if _fail_after == "move aside":
                raise RuntimeError("simulated crash between the two renames")
            os.replace(tmp, final)
            _fsync(r)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
            _fsync(r)
        # keep-last-K counts back from the checkpoint just written; never delete it, nor a higher-numbered
        # one (another run's, in a reused folder: not ours to delete)
        older = [c for c in list_checkpoints(r) if c.name < final.name]
        for old_ckpt in older[:max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old_ckpt, ignore_errors=True)
        path = final
    _barrier(trainer)
    return path


def load_checkpoint(trainer: Trainer, path: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, scheduler, version and RNG states from `path`; returns `extra`."""
    p = Path(path)
    for name in ("model.pt", "optim.pt", "trainer.pt"):
        if not (p / name).is_file():
            raise ValueError(f"{p} is not a learner checkpoint (missing {name})")
    opts = StateDictOptions(full_state_dict=True)
    # read everything before changing anything: a truncated file leaves the trainer as it was
    model_sd = torch.load(p / "model.pt", weights_only=True)
    optim_sd = torch.load(p / "optim.pt", weights_only=True)
    meta = torch.load(p / "trainer.pt", weights_only=False)   # our own file: python RNG state is a tuple
    set_model_state_dict(trainer.policy, model_sd, options=opts)
    set_optimizer_state_dict(trainer.policy, trainer.optimizer, optim_sd, options=opts)
    trainer.scheduler.load_state_dict(meta["scheduler"])
    trainer.version = int(meta["version"])
    trainer.skipped_updates = int(meta["skipped_updates"])
    states = meta["rng"] if isinstance(meta["rng"], list) else [meta["rng"]]   # older files: one state
    if trainer.rank >= len(states):
        log.warning("checkpoint %s has RNG states of %d rank(s); rank %d restores rank 0's", p, len(states),
                    trainer.rank)
    _set_rng_state(states[trainer.rank] if trainer.rank < len(states) else states[0])
    return dict(meta["extra"])


def load_latest(trainer: Trainer, root: str | Path) -> dict[str, Any] | None:
    """Restore the newest readable checkpoint under `root`; its `extra`, or None when there is none. A
    checkpoint whose files cannot be read (truncated, say) is skipped with a warning for the next older one;
    if none can be read the newest one's error is raised (never a silent fresh start)."""
    if Path(root).is_dir():
        _recover(Path(root))
    first: Exception | None = None
    for path in reversed(list_checkpoints(root)):
        try:
            return load_checkpoint(trainer, path)
        except Exception as e:  # noqa: BLE001 - any unreadable file: try the older checkpoint
            log.warning("checkpoint %s cannot be loaded (%s: %s); trying the previous one", path,
                        type(e).__name__, e)
            first = first or e
    if first is not None:
        raise first
    return None


def export_hf(trainer: Trainer, folder: str | Path, dtype: torch.dtype | None = None) -> Path:
    """Write an HF folder (config.json + safetensors) loadable by `models.hf_io.load_hf` and transformers.
    Every rank must call it (parameters are gathered one at a time); rank 0 writes."""
    from minirl_async.models.hf_io import save_hf

    out = Path(folder)
    trainer.reshard()   # fp32 masters, not the bf16 copies of the FSDP root unit
    if trainer.rank == 0:
        save_hf(trainer.model, trainer.mcfg, out, dtype=dtype)
    else:
        for _ in trainer.iter_full_state():
            pass
    _barrier(trainer)
    return out
