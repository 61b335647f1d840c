"""Bench: one learner update (forward + backward + global-norm clip + AdamW) of our Qwen3-MoE vs
transformers' `Qwen3MoeForCausalLM`, on the same tiny weights and batch, in one run.

    minirl-async bench learner [--quick] --json

Both sides compute the sampled tokens' log-probs and the same MiniRL loss (`compute_policy_loss`), then
backward, `clip_grad_norm_` and AdamW with the same settings (`fused=True`, the fastest CPU AdamW; the
optimizer is not what is compared); only the model differs (ours: written-out grouped experts and q/k
norm+rotary, LM head chunked over tokens; HF: its default experts implementation and full `[B, T, V]`
logits). The tiny default architecture (`model.arch`), random weights saved with `save_hf` and loaded
with `from_pretrained`.

Timing on a shared, noisy machine: one thread (`torch.set_num_threads(1)`), two warm-up updates per side,
then `repeats` rounds that alternate the order (ours, HF / HF, ours), each update timed by the thread's
CPU time (`time.thread_time`: not inflated when the scheduler preempts us for another process) and by the
wall clock; figures are medians. Tokens = B*T forwarded and back-propagated per update.
- `ratio` = ours / HF train tokens per CPU-second in fp32 (= `ratio_fp32`); `ratio_wall_fp32` the same
  from wall-clock medians (noisier here); `ratio_<dt>_rounds_q25_q50_q75`: quartiles of the per-round
  ratios (HF / ours in the same round), the spread behind the medians;
- `ours_<dt>_tok_s`, `hf_<dt>_tok_s` (CPU time) and `..._wall_tok_s` for fp32 and bf16 (bf16: parameters,
  compute and AdamW in bf16, the same for both sides; the learner itself keeps fp32 master weights);
- `ours_step_tok_s`: the whole `Trainer.train_step` (here N = 1: the update, whose forward is also the
  proximal pass, and the staleness pass: 2 forwards + 1 backward per token) in fp32, CPU time, for reference.
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any


def _timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(thread CPU seconds, wall seconds) of one call."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def _interleaved(fns: dict[str, Callable[[], object]], repeats: int, warmup: int = 2,
                 rounds: list[dict[str, float]] | None = None) -> dict[str, tuple[float, float]]:
    """Median (CPU, wall) seconds per function, measured in alternating order so that slow phases of the
    shared machine hit every side alike (each round's CPU seconds appended to `rounds` when given)."""
    for fn in fns.values():
        for _ in range(warmup):   # allocator, oneDNN/MKL primitive caches, optimizer state
            fn()
    samples: dict[str, list[tuple[float, float]]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for k in (names if r % 2 == 0 else names[::-1]):
            samples[k].append(_timed(fns[k]))
        if rounds is not None:
            rounds.append({k: v[-1][0] for k, v in samples.items()})
    return {k: (statistics.median(c for c, _ in v), statistics.median(w for _, w in v))
            for k, v in samples.items()}


def run(quick: bool) -> dict[str, Any]:
    import torch
    import transformers

    from minirl_async.algo.losses import LossConfig, compute_policy_loss
    from minirl_async.config import ModelArch
    from minirl_async.learner.trainer import PolicyLogprobs
    from minirl_async.models.config import ModelConfig
    from minirl_async.models.hf_io import save_hf
    from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

    threads = 1
    torch.set_num_threads(threads)
    transformers.logging.set_verbosity_error()
    B, T, repeats = (8, 64, 5) if quick else (16, 128, 11)
    vocab = 256
    torch.manual_seed(0)
    mcfg = ModelConfig.from_arch(ModelArch(), vocab_size=vocab)
    base = Qwen3MoeForCausalLM(mcfg)
    with tempfile.TemporaryDirectory() as folder:
        save_hf(base, mcfg, folder)
        hf_base = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    seq = torch.randint(1, vocab, (B, T + 1), generator=g)
    ids, targets = seq[:, :-1], seq[:, 1:]
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[:, : T // 4] = False          # a prompt quarter, as in RL batches
    loss_cfg = LossConfig()

    def updater(logprobs_fn: Callable[[], torch.Tensor], params: list[torch.nn.Parameter]) -> Callable[[], None]:
        opt = torch.optim.AdamW(params, lr=1e-5, fused=True)

        def update() -> None:
            lp = logprobs_fn()
            sg = lp.detach()
            loss, _ = compute_policy_loss(lp, sg, sg, adv, mask, loss_cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return update

    out: dict[str, Any] = {"batch": B, "seq_len": T, "threads": threads, "repeats": repeats,
                           "params_m": round(sum(p.numel() for p in base.parameters()) / 1e6, 3),
                           "hf_experts_implementation": getattr(hf_base.config, "_experts_implementation", None),
                           "hf_attn_implementation": hf_base.config._attn_implementation}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = PolicyLogprobs(copy.deepcopy(base).to(dt))
        hf = copy.deepcopy(hf_base).to(dt)

        def ours_lp(m: Any = ours) -> torch.Tensor:
            return m(ids, targets, None, 1.0, 1024, False)[0]

        def hf_lp(m: Any = hf) -> torch.Tensor:
            logits = m(input_ids=ids, use_cache=False).logits.float()   # a learner needs no KV cache
            return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)

        rounds: list[dict[str, float]] = []
        t = _interleaved({"ours": updater(ours_lp, list(ours.parameters())),
                          "hf": updater(hf_lp, list(hf.parameters()))}, repeats, rounds=rounds)
        q = statistics.quantiles(sorted(r["hf"] / r["ours"] for r in rounds), n=4, method="inclusive")
        out[f"ratio_{name}_rounds_q25_q50_q75"] = [round(x, 3) for x in q]
        (c_ours, w_ours), (c_hf, w_hf) = t["ours"], t["hf"]
        out[f"ours_{name}_tok_s"] = round(B * T / c_ours, 1)
        out[f"hf_{name}_tok_s"] = round(B * T / c_hf, 1)
        out[f"ratio_{name}"] = round(c_hf / c_ours, 3)
        out[f"ours_{name}_wall_tok_s"] = round(B * T / w_ours, 1)
        out[f"hf_{name}_wall_tok_s"] = round(B * T / w_hf, 1)
        out[f"ratio_wall_{name}"] = round(w_hf / w_ours, 3)
        del ours, hf

    # the full train step of the Trainer (fp32), for reference
    from minirl_async.config import load_config
    from minirl_async.learner.batch import Group, Sample
    from minirl_async.learner.trainer import Trainer

    G = 4
    cfg = load_config(None, ["learner.compute_dtype=fp32", f"learner.groups_per_step={B // G}",
                             f"learner.minibatch_groups={B // G}", f"algo.group_size={G}"])
    groups = [Group(f"g{i}", [Sample(prompt_ids=seq[i * G + j, : T // 4 + 1], response_ids=seq[i * G + j, T // 4 + 1:],
                                     rollout_logprobs=torch.full((T - T // 4,), -5.0), reward=float(j % 2))
                              for j in range(G)]) for i in range(B // G)]
    trainer = Trainer(cfg, copy.deepcopy(base))
    c_step, _ = _interleaved({"step": lambda: trainer.train_step(groups, "r2")}, max(3, repeats // 3),
                             warmup=1)["step"]
    out["ours_step_tok_s"] = round(B * T / c_step, 1)
    out["dtype"] = "fp32"
    out["ours_tok_s"], out["hf_tok_s"], out["ratio"] = out["ours_fp32_tok_s"], out["hf_fp32_tok_s"], out["ratio_fp32"]
    return out
