"""Held-out evaluation of a checkpoint: greedy accuracy, sampled pass@1 / pass@k, response lengths.

    minirl-async eval -c configs/tiny.toml --checkpoint runs/tiny/sft [--json]
    evaluate(cfg, "runs/tiny/sft") -> dict          # the launcher calls this at the end of a run

Prompts: the first `data.num_eval` of the eval split (disjoint from training). Sampling uses
`sampler.temperature` (1.0 when it is 0) and `data.eval_samples` responses per prompt; rewards come from the
configured grader through the grader runner (a failed grading counts as wrong and is reported).

Generation (`generator=`): "engine" (default) runs the configured sampler engine (`sampler.engine`,
`sampler.fp8`, `sampler.compute_dtype`: what the samplers of a run produce); "plain" runs the small fp32
loop of `tasks/generate.py` (the policy's own weights, no FP8). Prints a table, then one JSON line (only
the JSON line with --json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from minirl_async.config import Config, load_config
from minirl_async.graders.base import Sample
from minirl_async.graders.runner import GraderRunner
from minirl_async.tasks.base import Prompt, take
from minirl_async.tasks.generate import Generation, generate
from minirl_async.tasks.source import make_prompt_source
from minirl_async.tasks.tokenizer import Tokenizer, load_tokenizer


def _grade(runner: GraderRunner, prompts: list[Prompt], prompt_ids: list[list[int]], responses: list[list[int]],
           reasons: list[str], tok: Tokenizer) -> tuple[list[float], int]:
    samples = [
        Sample(prompt_text=p.text, response_text=tok.decode(r), meta=p.meta, prompt_ids=pi, response_ids=r,
               finish_reason=why)
        for p, pi, r, why in zip(prompts, prompt_ids, responses, reasons)
    ]
    result = asyncio.run(runner.grade_group(samples))
    return [1.0 if r >= 1.0 else r for r in result.rewards], result.num_errors


def _engine_generator(cfg: Config, model: torch.nn.Module, mcfg: Any,
                      checkpoint: str | Path) -> tuple[Callable[..., Generation], str]:
    """The sampler engine of the config, loaded with the checkpoint, behind `generate`'s signature."""
    from minirl_async.engine.base import GenerateRequest, SamplingParams, make_engine
    from minirl_async.models.hf_io import iter_hf_state

    ecfg = cfg.model_copy(deep=True)
    ecfg.sampler.capture_routes = False
    ecfg.sampler.max_batch_size = max(cfg.sampler.max_batch_size, 128)
    engine = make_engine(ecfg, model_cfg=mcfg, state=iter_hf_state(model), version=0, model_path=str(checkpoint))

    def gen(prompt_ids: list[list[int]], max_new: int, temperature: float, eos_id: int, pad_id: int,
            seed: int = 0) -> Generation:
        params = SamplingParams(temperature=temperature, max_new_tokens=max_new, stop_token_ids=(eos_id,))
        reqs = [GenerateRequest(p, replace(params, seed=seed * 1_000_003 + i)) for i, p in enumerate(prompt_ids)]
        outs = [group[0] for group in engine.generate(reqs)]
        return Generation([o.response_ids.tolist() for o in outs], [o.finish_reason for o in outs])

    label = f"{cfg.sampler.engine}(fp8={cfg.sampler.fp8}, {cfg.sampler.compute_dtype})"
    return gen, label


def evaluate(cfg: Config, checkpoint: str | Path, num_prompts: int | None = None, k: int | None = None,
             seed: int = 0, generator: str = "engine") -> dict[str, Any]:
    """Evaluate `checkpoint` (HF folder with tokenizer.json) on the held-out split; returns the figures."""
    from minirl_async.models.hf_io import load_hf

    t0 = time.monotonic()
    torch.set_num_threads(cfg.learner.threads)
    model, mcfg = load_hf(checkpoint, dtype=torch.float32)
    model.eval()
    tok = load_tokenizer(cfg, checkpoint)
    n = num_prompts or cfg.data.num_eval
    k = k or cfg.data.eval_samples
    temperature = cfg.sampler.temperature or 1.0
    max_new = cfg.sampler.max_new_tokens
    prompts = take(make_prompt_source(cfg, "eval"), n)
    prompt_ids = [tok.encode_prompt(p) for p in prompts]
    runner = GraderRunner.from_config(cfg.grader)
    if generator == "engine":
        gen_fn, label = _engine_generator(cfg, model, mcfg, checkpoint)
    elif generator == "plain":
        gen_fn, label = partial(generate, model), "plain_fp32"
    else:
        raise ValueError(f"generator={generator!r}: choose 'engine' or 'plain'")
    try:
        greedy = gen_fn(prompt_ids, max_new, 0.0, tok.eos_id, tok.pad_id, seed=seed)
        g_rewards, g_err = _grade(runner, prompts, prompt_ids, greedy.response_ids, greedy.finish_reasons, tok)
        rep_prompts = [p for p in prompts for _ in range(k)]
        rep_ids = [pi for pi in prompt_ids for _ in range(k)]
        sampled = gen_fn(rep_ids, max_new, temperature, tok.eos_id, tok.pad_id, seed=seed + 1)
        s_rewards, s_err = _grade(runner, rep_prompts, rep_ids, sampled.response_ids, sampled.finish_reasons, tok)
    finally:
        runner.close()
    lengths = [len(r) for r in sampled.response_ids]
    return {
        "checkpoint": str(checkpoint),
        "task": cfg.data.task,
        "difficulty": cfg.data.difficulty,
        "num_prompts": n,
        "k": k,
        "temperature": temperature,
        **accuracy(g_rewards, s_rewards, k),
        "resp_len_mean": round(statistics.fmean(lengths), 2),
        "resp_len_min": min(lengths),
        "resp_len_p50": int(statistics.median(lengths)),
        "resp_len_max": max(lengths),
        "greedy_len_mean": round(statistics.fmean(len(r) for r in greedy.response_ids), 2),
        "truncated_frac": round(statistics.fmean(float(w == "length") for w in sampled.finish_reasons), 4),
        "grader_errors": g_err + s_err,
        "generator": label,
        "seconds": round(time.monotonic() - t0, 1),
    }


def accuracy(greedy_rewards: list[float], sampled_rewards: list[float], k: int) -> dict[str, float]:
    """greedy_acc, pass@1, pass@k (the k samples of a prompt are consecutive) and the mean sampled reward.
    A response succeeds when its reward is >= 1: partial credit is a miss for every pass@ figure alike."""
    ok = [r >= 1.0 for r in sampled_rewards]
    per_prompt = [ok[i:i + k] for i in range(0, len(ok), k)]
    return {"greedy_acc": round(statistics.fmean(float(r >= 1.0) for r in greedy_rewards), 4),
            "pass@1": round(statistics.fmean(map(float, ok)), 4),
            f"pass@{k}": round(statistics.fmean(float(any(p)) for p in per_prompt), 4),
            "reward_mean": round(statistics.fmean(sampled_rewards), 4)}


def format_table(res: dict[str, Any]) -> str:
    width = max(len(k) for k in res)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in res.items())


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    res = evaluate(cfg, args.checkpoint)
    if not args.json:
        print(format_table(res))
    print(json.dumps(res))
    return 0
