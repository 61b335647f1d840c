"""Adapters from the services' small interfaces (services/compute.py) to the real compute: the sampler
engine (`minirl_async.engine`) and the trainer (`minirl_async.learner`). Conversions only: PromptGroups to
engine requests and engine rollouts to wire messages; WeightSets to engine updates; ScoredGroups to the
trainer's batch.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from minirl_async.proto.messages import PromptGroup, Response, RolloutGroup, ScoredGroup
from minirl_async.proto.weights import WeightSet

from minirl_async.config import Config


def request_seed(base: int, group_id: str, attempt: int) -> int:
    """A per-request seed: reproducible for (run seed, group, attempt), different for a re-issue."""
    h = hashlib.blake2b(f"{base}:{group_id}:{attempt}".encode(), digest_size=4).digest()
    return int.from_bytes(h, "little")


def _np(t: torch.Tensor, dtype: Any) -> np.ndarray:
    return t.detach().cpu().numpy().astype(dtype, copy=False)


def check_weight_format(ws: WeightSet, *, fp8: bool, fp8_block: int) -> None:
    """Refuse (WeightUpdateError) a WeightSet whose FP8 format differs from the engine's: FP8 with block
    `fp8_block` for an FP8 sampler, plain tensors otherwise. The engines check scale SHAPES against their own
    block, but those coincide across blocks for small tensors (a 64x64 weight has a 1x1 scale with block 64
    or 128), and the weights would be dequantised with the wrong block; only the wire's `fp8_block` says."""
    from minirl_async.engine.base import WeightUpdateError

    def fmt(is_fp8: bool, block: int) -> str:
        return f"block-FP8 with block {block}" if is_fp8 else "unquantised"

    if (bool(ws.fp8), int(ws.fp8_block) if ws.fp8 else 0) != (fp8, fp8_block if fp8 else 0):
        raise WeightUpdateError(
            f"weight update v{ws.version} refused, old weights kept: it is {fmt(ws.fp8, ws.fp8_block)} but this "
            f"sampler expects {fmt(fp8, fp8_block)} (sampler.fp8 = {str(fp8).lower()}, model.fp8_block_size = "
            f"{fp8_block}); the learner and the samplers must run with the same sampler.fp8 and "
            "model.fp8_block_size")


class RealEngine:
    """The configured engine (torch_fp8 or sglang) behind the sampler service's interface."""

    def __init__(self, cfg: Config, index: int, checkpoint: str):
        from minirl_async.engine.base import make_engine
        from minirl_async.models.hf_io import read_hf_config
        from minirl_async.tasks.tokenizer import load_tokenizer

        self.cfg, self.index = cfg, index
        model_cfg, _ = read_hf_config(checkpoint)
        self.tok = load_tokenizer(cfg, checkpoint)
        # No weights yet: the learner's version arrives over the weights channel (WeightsRequest at start).
        self.engine = make_engine(cfg, model_cfg=model_cfg, state=None, version=-1, model_path=checkpoint,
                                  index=index)

    @property
    def version(self) -> int:
        return int(self.engine.version)

    def update_weights(self, ws: WeightSet) -> None:
        """Raises WeightUpdateError (old weights kept) for a set whose FP8 format is not this sampler's."""
        check_weight_format(ws, fp8=self.cfg.sampler.fp8, fp8_block=self.cfg.model.fp8_block_size)
        self.engine.update_weights(ws.version, ws.tensors)

    def reset(self) -> None:
        self.engine.reset()

    def generate(self, groups: list[PromptGroup]) -> list[RolloutGroup]:
        from minirl_async.engine.base import GenerateRequest, SamplingParams

        s = self.cfg.sampler
        reqs = [GenerateRequest(
            prompt_ids=g.prompt_ids.tolist(), request_id=g.group_id,
            params=SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k,
                                  max_new_tokens=s.max_new_tokens, stop_token_ids=(self.tok.eos_id,),
                                  n=g.group_size, seed=request_seed(self.cfg.run.seed, g.group_id, g.attempt)))
            for g in groups]
        t0 = time.monotonic()
        outs = self.engine.generate(reqs)
        gen_s = time.monotonic() - t0
        result = []
        for g, rollouts in zip(groups, outs):
            responses = []
            for r in rollouts:
                routes = None if r.routes is None else _np(r.routes, np.uint8 if r.routes.dtype == torch.uint8
                                                           else np.int32)
                responses.append(Response(response_ids=_np(r.response_ids, np.int32),
                                          logprobs=_np(r.logprobs, np.float32),
                                          versions=_np(r.versions, np.int32), routes=routes,
                                          finish_reason=r.finish_reason))
            result.append(RolloutGroup(group_id=g.group_id, attempt=g.attempt, prompt_ids=g.prompt_ids,
                                       meta=g.meta, sampler_id=f"sampler-{self.index}", responses=responses,
                                       timings={"generate_s": gen_s}))
        return result


class RealTrainer:
    """The learner's Trainer behind the learner service's interface (see services/compute.py). Every rank
    builds one; the learner service keeps the ranks in step (same calls, same order)."""

    def __init__(self, cfg: Config, run_dir: Path, checkpoint: str):
        from minirl_async.learner.fsdp import init_distributed
        from minirl_async.learner.trainer import Trainer

        init_distributed(cfg.learner.device)
        self.cfg, self.run_dir = cfg, run_dir
        self.impl = Trainer.from_config(cfg, checkpoint)

    def state_fn(self) -> Any:
        return self.impl.iter_full_state()

    def step(self, groups: list[ScoredGroup], replay_mode: int, version: int) -> dict[str, Any]:
        from minirl_async.learner.batch import Group
        from minirl_async.staleness import MODE_NAMES

        assert self.impl.version == version, (self.impl.version, version)
        return dict(self.impl.train_step([Group.from_scored(g) for g in groups], replay_mode=MODE_NAMES[replay_mode]))

    def invalid_groups(self, groups: list[ScoredGroup]) -> dict[str, str]:
        """`{group_id: reason}` for the groups `step` would refuse (token ids outside the vocab, expert ids
        outside the model, bad shapes...): the learner refuses them on arrival instead."""
        from minirl_async.learner.batch import Group

        return dict(self.impl.invalid_groups([Group.from_scored(g) for g in groups]))

    def save_checkpoint(self, step: int, extra: dict[str, Any]) -> Path | None:
        assert self.impl.version == step, (self.impl.version, step)
        return self.impl.save_checkpoint(self.run_dir / "checkpoints", extra)

    def load_latest(self) -> dict[str, Any] | None:
        return self.impl.load_latest(self.run_dir / "checkpoints")

    def export(self, folder: Path) -> Path:
        return Path(self.impl.export_hf(folder))
