"""Bench: the embedded torch_fp8 engine vs Hugging Face `generate()` on the same tiny Qwen3-MoE weights.

    minirl-async bench sampler [--quick] --json

One run, one thread (`torch.set_num_threads(1)`), same random weights (saved with `save_hf`, loaded by
`transformers.AutoModelForCausalLM.from_pretrained` in bf16), same prompts, batch size and number of new
tokens (HF: `min_new_tokens = max_new_tokens`, no EOS; ours: no stop tokens, so every sequence runs to
`max_new_tokens`), both sampling at temperature 1 with no truncation. Ours runs block-FP8 weights with bf16
compute and routed-expert capture on (the production setting). Figures (best of `repeats` interleaved
timed runs after a warm-up; CPU seconds of the single compute thread, because the machine is shared):
- `ours_tok_s`, `hf_tok_s`, `ratio` = ours / HF (new tokens per CPU-second, prefill included), and the
  same per wall-clock second (`*_wall_tok_s`);
- `ours_nocapture_tok_s` (the same engine with capture switched off, so both use the same weights at the
  same addresses) and `capture_overhead`: the median relative extra CPU time of capture over back-to-back
  pairs of runs, with its quartiles (`capture_overhead_q25_q75`) as the measurement's resolution;
- `ratio_rounds_q25_q50_q75`: quartiles of the per-round ratio (HF CPU time / ours in the same round): the
  spread behind the best-of `ratio` on this noisy machine;
- `ms_per_token_step` (our generate CPU time / new tokens: one decode step of the batch plus its share of
  prefill and sampling) and `dequant_per_step_ms` (one dequantisation of every
  FP8 weight: what dequantising per matmul would add to each step, the reason weights are cached).
"""

from __future__ import annotations

import tempfile
import time
from typing import Any


def _model_cfg(vocab: int) -> Any:
    from minirl_async.config import ModelArch
    from minirl_async.models.config import ModelConfig

    return ModelConfig.from_arch(ModelArch(), vocab_size=vocab)  # the tiny default architecture


def _race(fns: dict[str, Any], repeats: int, rounds: list[dict[str, float]] | None = None
          ) -> dict[str, tuple[float, float]]:
    """Best (CPU seconds, wall seconds) of each function over `repeats` interleaved rounds, after a warm-up
    (each round's CPU seconds appended to `rounds` when given).
    CPU time of this process (one torch thread) is what `ratio` uses: on a shared machine wall time mostly
    measures the neighbours; interleaving spreads what load remains evenly over the contenders. Each round
    starts with a different contender and each run with a collected heap: in a fixed order, the run right
    after Hugging Face's was consistently ~5-15% faster than the next one (garbage left for the collector),
    enough to fake a negative capture overhead."""
    import gc

    for fn in fns.values():
        fn()  # warm-up (allocator, oneDNN primitive caches)
    best = {k: (float("inf"), float("inf")) for k in fns}
    names = list(fns)
    for r in range(repeats):
        this: dict[str, float] = {}
        for k in names[r % len(names):] + names[:r % len(names)]:
            gc.collect()
            c0, t0 = time.process_time(), time.perf_counter()
            fns[k]()
            c, t = time.process_time() - c0, time.perf_counter() - t0
            best[k] = (min(best[k][0], c), min(best[k][1], t))
            this[k] = c
        if rounds is not None:
            rounds.append(this)
    return best


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    import statistics

    if len(xs) < 2:
        return xs[0], xs[0], xs[0]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[1], q[2]


def _paired_overhead(run: Any, pairs: int) -> tuple[float, float, float]:
    """Quartiles (25%, 50%, 75%) of the relative extra CPU time of `run(True)` over `run(False)` in
    back-to-back pairs (which one goes first alternates). Pairing cancels the slow drifts of a shared
    machine, whose run-to-run spread (~10% here) exceeds the few percent being measured."""
    import gc
    import statistics

    diffs = []
    for i in range(pairs):
        t = {}
        for on in ((True, False) if i % 2 else (False, True)):
            gc.collect()
            c0 = time.process_time()
            run(on)
            t[on] = time.process_time() - c0
        diffs.append(t[True] / t[False] - 1)
    q = statistics.quantiles(diffs, n=4)
    return q[0], q[1], q[2]


def run(quick: bool) -> dict[str, Any]:
    return measure(*((8, 16, 32, 3) if quick else (16, 32, 128, 5)))


def measure(batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict[str, Any]:
    import torch
    import transformers

    from minirl_async.engine.base import GenerateRequest, SamplingParams
    from minirl_async.engine.torch_fp8 import TorchFP8Engine
    from minirl_async.models.fp8 import dequantize_block_fp8, quantize_state
    from minirl_async.models.hf_io import iter_hf_state, save_hf
    from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    vocab, block = 256, 32
    torch.manual_seed(0)
    mcfg = _model_cfg(vocab)
    model = Qwen3MoeForCausalLM(mcfg)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, vocab, (batch, prompt_len), generator=gen)

    # One engine for both capture settings: two instances hold their weights at different addresses, and on
    # this CPU that alone moved throughput by up to ~12% either way, more than the overhead being measured.
    ours = TorchFP8Engine(mcfg, fp8=True, fp8_block=block, dtype=torch.bfloat16, max_batch_size=batch,
                          max_context=prompt_len + new_tokens + 1)
    ours.update_weights(0, iter_hf_state(model))
    params = SamplingParams(temperature=1.0, max_new_tokens=new_tokens, seed=0)
    reqs = [GenerateRequest(p.tolist(), params) for p in prompts]

    def run_ours(capture: bool) -> None:
        ours.capture_routes = capture
        out = ours.generate(reqs)
        assert all(r[0].num_tokens == new_tokens and (r[0].routes is not None) == capture for r in out)

    with tempfile.TemporaryDirectory() as folder:
        save_hf(model, mcfg, folder)
        hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    ids = prompts
    mask = torch.ones_like(ids)

    def run_hf() -> None:
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                              top_p=1.0, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              eos_token_id=None, pad_token_id=0)
        assert out.shape == (batch, prompt_len + new_tokens)

    rounds: list[dict[str, float]] = []
    best = _race({"ours": lambda: run_ours(True), "nocapture": lambda: run_ours(False), "hf": run_hf}, repeats,
                 rounds)
    per_round = sorted(r["hf"] / r["ours"] for r in rounds)
    (t_ours, w_ours), (t_nc, _), (t_hf, w_hf) = best["ours"], best["nocapture"], best["hf"]
    overhead_q = _paired_overhead(run_ours, 4 * repeats)

    fp8_state = dict(quantize_state(iter_hf_state(model), block))
    pairs = [(fp8_state[n], fp8_state[n + "_scale_inv"]) for n in fp8_state if n + "_scale_inv" in fp8_state]

    def dequant_all() -> None:
        for q, s in pairs:
            dequantize_block_fp8(q, s, block, torch.bfloat16)

    t_deq = _race({"deq": dequant_all}, repeats)["deq"][0]
    n_tok = batch * new_tokens
    ours_tok_s, nc_tok_s, hf_tok_s = n_tok / t_ours, n_tok / t_nc, n_tok / t_hf
    return {
        "batch": batch, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 3),
        "ours_tok_s": round(ours_tok_s, 1), "hf_tok_s": round(hf_tok_s, 1), "ratio": round(ours_tok_s / hf_tok_s, 2),
        "ours_wall_tok_s": round(n_tok / w_ours, 1), "hf_wall_tok_s": round(n_tok / w_hf, 1),
        "ours_nocapture_tok_s": round(nc_tok_s, 1),
        "capture_overhead": round(overhead_q[1], 4),
        "capture_overhead_q25_q75": [round(overhead_q[0], 4), round(overhead_q[2], 4)],
        "ratio_rounds_q25_q50_q75": [round(q, 2) for q in _quartiles(per_round)],
        "ms_per_token_step": round(t_ours / new_tokens * 1e3, 3),
        "dequant_per_step_ms": round(t_deq * 1e3, 3),
    }
