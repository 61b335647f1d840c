"""Factories for the compute behind the services: the sampler engine and the trainer, or their fakes
(`run.fake_compute`). The services call only the small interfaces below, so the real implementations
(minirl_async.engine, minirl_async.learner) plug in here without the services changing.

Engine (sampler side):  .version (int, -1 = none) | .update_weights(WeightSet) | .generate(list[PromptGroup])
                        -> list[RolloutGroup] (blocking; run in a worker thread) | .reset() (forget weights)
Trainer (learner side): .step(list[ScoredGroup], replay_mode, version) -> metrics | .state_fn() -> iterable of
                        (hf_name, tensor) to publish | .save_checkpoint(step, extra) | .load_latest() -> extra
                        or None | .export(folder) | optionally .invalid_groups(list[ScoredGroup]) -> {group_id:
                        reason} for groups .step would refuse (checked on arrival; the fake has no model to check)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from minirl_async.config import Config


def init_checkpoint(cfg: Config) -> str:
    """The HF folder RL starts from: the cold-start checkpoint, else model.path."""
    path = cfg.run.sft_checkpoint or cfg.model.path
    if not path and not cfg.run.fake_compute:
        raise ValueError("no starting checkpoint: set run.sft_checkpoint (or model.path), or start with "
                         "`minirl-async run`, which runs the cold-start SFT first")
    return path


def make_engine(cfg: Config, index: int) -> Any:
    """The sampler engine of `sampler.engine` (or the fake)."""
    if cfg.run.fake_compute:
        from minirl_async.services.fakes import FakeEngine

        return FakeEngine(cfg, seed=cfg.run.seed * 1000 + index)
    from minirl_async.services.real import RealEngine

    return RealEngine(cfg, index, init_checkpoint(cfg))


def make_trainer(cfg: Config, run_dir: Path) -> Any:
    """The trainer (rank-local) for the learner service (or the fake)."""
    if cfg.run.fake_compute:
        from minirl_async.services.fakes import FakeTrainer

        return FakeTrainer(cfg, run_dir)
    from minirl_async.services.real import RealTrainer

    return RealTrainer(cfg, run_dir, init_checkpoint(cfg))
