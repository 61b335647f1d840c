"""Sampler engines behind one interface (base.py): `torch_fp8` (embedded default) and `sglang` (GPU adapter).

    from minirl_async.engine import GenerateRequest, SamplingParams, make_engine
    eng = make_engine(cfg, model_cfg=mcfg, state=iter_hf_state(model), version=0)
    rollouts = eng.generate([GenerateRequest(prompt_ids, SamplingParams(n=8, seed=1))])   # blocking

Files: base.py (interface, requests, rollouts, factory), torch_fp8.py (embedded engine loop), fast_decode.py
(packed one-token decode step), kv_cache.py (static slot cache), sampling.py (temperature/top-p/top-k),
weights.py (weight-update validation, FP8 preparation), sglang_engine.py (sglang.Engine adapter).
"""

from minirl_async.engine.base import (
    Engine,
    GenerateRequest,
    Rollout,
    SamplingParams,
    WeightUpdateError,
    make_engine,
)

__all__ = ["Engine", "GenerateRequest", "Rollout", "SamplingParams", "WeightUpdateError", "make_engine"]
