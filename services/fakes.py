"""Fakes of the sampler engine and the trainer, with the interfaces the services use (`run.fake_compute`).

They let the pipeline (sockets, controller, ledger, staleness, supervision) run and be tested in seconds
with no model: the fake engine answers each prompt with either the right answer or a random string (so
rewards vary within a group), tags every token with its weight version, and keeps a core busy for
`run.fake_step_s`
per batch; the fake trainer holds one small tensor that changes every step (so weight streaming is
exercised end to end), keeps a core busy for `run.fake_step_s` per step and returns every trainer-owned metric name
of ALGORITHM.md section 7.

    engine = FakeEngine(cfg, seed=0); engine.update_weights(weight_set); rollouts = engine.generate(groups)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from minirl_async.proto.messages import PromptGroup, Response, RolloutGroup, ScoredGroup
from minirl_async.proto.weights import WeightSet

from minirl_async.config import Config
from minirl_async.tasks.synthetic import ANSWER_PREFIX
from minirl_async.tasks.tokenizer import build_char_tokenizer

FAKE_TENSOR = "model.norm.weight"  # 1-D: never FP8-quantised, so it round-trips exactly


def burn(seconds: float) -> None:
    """Keep one core busy for `seconds` (not sleep: the overlap bench must compete for real CPU)."""
    a = torch.randn(64, 64)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a = torch.tanh(a @ a)


class FakeEngine:
    """Random or right answers, no model; per-token versions are the applied weight version."""

    def __init__(self, cfg: Config, seed: int = 0):
        self.cfg, self.rng = cfg, random.Random(seed)
        self.tok = build_char_tokenizer()
        self.version = -1
        self.value = 0.0
        arch = cfg.model.arch
        self.num_layers = arch.num_hidden_layers
        self.top_k, self.num_experts = arch.num_experts_per_tok, arch.num_experts

    def update_weights(self, ws: WeightSet) -> None:
        if FAKE_TENSOR not in ws.tensors:
            raise ValueError(f"fake engine: weight update v{ws.version} lacks {FAKE_TENSOR}")
        if ws.version <= self.version:
            raise ValueError(f"fake engine: version {ws.version} is not newer than {self.version}")
        self.value = float(ws.tensors[FAKE_TENSOR].float()[0])
        self.version = ws.version

    def reset(self) -> None:
        """Forget the weights (the learner rolled back to an older version)."""
        self.version = -1

    def generate(self, groups: list[PromptGroup]) -> list[RolloutGroup]:
        assert self.version >= 0, "generate before any weights"
        t0 = time.monotonic()
        burn(self.cfg.run.fake_step_s)
        out = []
        for g in groups:
            responses = []
            for _ in range(g.group_size):
                if self.rng.random() < 0.5:
                    text = ANSWER_PREFIX + str(g.meta.get("answer", ""))
                else:
                    text = ANSWER_PREFIX + str(self.rng.randint(0, 999))
                ids = self.tok.encode_response(text)[: self.cfg.sampler.max_new_tokens]
                n, p = len(ids), int(g.prompt_ids.shape[0])
                routes = None
                if self.cfg.sampler.capture_routes:
                    routes = np.array([[[self.rng.randrange(self.num_experts) for _ in range(self.top_k)]
                                        for _ in range(self.num_layers)] for _ in range(p + n - 1)], dtype=np.uint8)
                responses.append(Response(
                    response_ids=np.array(ids, dtype=np.int32),
                    logprobs=np.array([-self.rng.random() for _ in ids], dtype=np.float32),
                    versions=np.full(n, self.version, dtype=np.int32), routes=routes,
                    finish_reason="stop" if ids and ids[-1] == self.tok.eos_id else "length"))
            out.append(RolloutGroup(group_id=g.group_id, attempt=g.attempt, prompt_ids=g.prompt_ids, meta=g.meta,
                                    sampler_id="fake", responses=responses,
                                    timings={"generate_s": time.monotonic() - t0}))
        return out


class FakeTrainer:
    """One tensor that moves every step; metrics with every trainer-owned name; JSON checkpoints."""

    TRAINER_METRICS = ("kl/train_infer_k1", "kl/train_infer_k3", "kl/staleness_k3", "policy/entropy",
                       "loss/clip_frac", "is/d_mean", "is/d_max", "is/trunc_frac", "routing/agree_frac")

    def __init__(self, cfg: Config, run_dir: Path):
        self.cfg, self.run_dir = cfg, run_dir
        self.w = torch.zeros(8)
        self.steps = 0

    def state_fn(self) -> Iterable[tuple[str, torch.Tensor]]:
        return [(FAKE_TENSOR, self.w)]

    def step(self, groups: list[ScoredGroup], replay_mode: int, version: int) -> dict[str, Any]:
        burn(self.cfg.run.fake_step_s)
        self.w = self.w + 1.0
        self.steps += 1
        m: dict[str, Any] = {k: 0.0 for k in self.TRAINER_METRICS}
        m["is/d_mean"] = m["is/d_max"] = 1.0
        for layer in range(self.cfg.model.arch.num_hidden_layers):
            m[f"routing/agree_frac_l{layer}"] = 0.0
        m["loss/policy"] = 0.0
        return m

    # ---- checkpoints: the real trainer's layout is its own; the fake only needs the same calls
    def save_checkpoint(self, step: int, extra: dict[str, Any]) -> Path:
        d = self.run_dir / "checkpoints"
        d.mkdir(parents=True, exist_ok=True)
        path = d / f"step_{step:06d}.json"
        if int(os.environ.get("RANK", "0")) != 0:   # rank 0 writes (as the real trainer); ranks shared one tmp
            return path
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"step": step, "w": self.w.tolist(), "extra": extra}))
        tmp.replace(path)  # atomic: a crash mid-write never corrupts the last good checkpoint
        for old in sorted(d.glob("step_*.json"))[: -self.cfg.learner.keep_last]:
            old.unlink()
        return path

    def load_latest(self) -> dict[str, Any] | None:
        files = sorted((self.run_dir / "checkpoints").glob("step_*.json"))
        if not files:
            return None
        state = json.loads(files[-1].read_text())
        self.w = torch.tensor(state["w"])
        return dict(state["extra"])

    def export(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "fake_weights.json").write_text(json.dumps(self.w.tolist()))
        return folder

