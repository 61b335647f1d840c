"""Bench: one learner update (forward + backward + global-norm clip + AdamW) of our Qwen3-MoE vs
transformers' `Qwen3MoeForCausalLM`, on the same tiny weights and batch, in one run.

    minirl-async bench learner [--quick] --json

Both sides compute the sampled tokens' log-probs and the same MiniRL loss (`compute_policy_loss`), then
backward, `clip_grad_norm_` and `torch.optim.AdamW`; only the model differs (ours: grouped experts, LM head
chunked over tokens; HF: its eager per-expert loop and full `[B, T, V]` logits). One thread
(`torch.set_num_threads(1)`), the tiny default architecture (`model.arch`), random weights saved with
`save_hf` and loaded with `from_pretrained`. Figures (tokens = B*T forwarded and back-propagated; best of
`repeats` timed updates after a warm-up):
- `ours_tok_s`, `hf_tok_s`, `ratio` = ours / HF, in `dtype` (parameters and compute in that dtype);
- `ours_<dt>_tok_s`, `hf_<dt>_tok_s` for fp32 and bf16 (bf16: parameters, compute and AdamW in bf16, the
  same for both sides; the learner itself keeps fp32 master weights);
- `ours_step_tok_s`: the whole `Trainer.train_step` (proximal pass, update, staleness pass: about 3
  forwards + 1 backward per token) in fp32, for reference.
"""

from __future__ import annotations

import copy
import tempfile
import time
from typing import Any


def _best(fn: Any, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive caches)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def run(quick: bool) -> dict[str, Any]:
    import torch
    import transformers

    from minirl_async.algo.losses import LossConfig, compute_policy_loss
    from minirl_async.config import ModelArch
    from minirl_async.learner.trainer import PolicyLogprobs
    from minirl_async.models.config import ModelConfig
    from minirl_async.models.hf_io import save_hf
    from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    B, T, repeats = (8, 64, 2) if quick else (16, 128, 3)
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

    def updater(logprobs_fn: Any, params: Any) -> Any:
        opt = torch.optim.AdamW(params, lr=1e-5)

        def update() -> None:
            lp = logprobs_fn()
            sg = lp.detach()
            loss, _ = compute_policy_loss(lp, sg, sg, adv, mask, loss_cfg)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        return update

    out: dict[str, Any] = {"batch": B, "seq_len": T, "params_m": round(sum(p.numel() for p in base.parameters())
                                                                         / 1e6, 3)}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = PolicyLogprobs(copy.deepcopy(base).to(dt))
        hf = copy.deepcopy(hf_base).to(dt)

        def ours_lp(m: Any = ours) -> Any:
            return m(ids, targets, None, 1.0, 1024, False)[0]

        def hf_lp(m: Any = hf) -> Any:
            logits = m(input_ids=ids).logits.float()
            return torch.log_softmax(logits, -1).gather(-1, targets[..., None]).squeeze(-1)

        t_ours = _best(updater(ours_lp, list(ours.parameters())), repeats)
        t_hf = _best(updater(hf_lp, list(hf.parameters())), repeats)
        out[f"ours_{name}_tok_s"] = round(B * T / t_ours, 1)
        out[f"hf_{name}_tok_s"] = round(B * T / t_hf, 1)
        out[f"ratio_{name}"] = round(t_hf / t_ours, 2)

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
    t_step = _best(lambda: trainer.train_step(groups, "r2"), repeats)
    out["ours_step_tok_s"] = round(B * T / t_step, 1)
    best = max(("fp32", "bf16"), key=lambda n: out[f"ours_{n}_tok_s"])
    out["dtype"] = best
    out["ours_tok_s"], out["hf_tok_s"], out["ratio"] = (out[f"ours_{best}_tok_s"], out[f"hf_{best}_tok_s"],
                                                        out[f"ratio_{best}"])
    return out
