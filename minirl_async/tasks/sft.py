"""Cold-start SFT: train the policy from scratch (or from `model.path`) on worked solutions, loss on
response tokens only, then save an HF-format checkpoint with its tokenizer.json.

    minirl-async sft -c configs/tiny.toml [key=value ...] [--out DIR]     # default DIR: <run.dir>/sft

Settings live in `[data.sft]` (steps, batch_size, lr, max_minutes, slip: the rate of deliberate slips in
the worked solutions, emulating imperfect demonstrations); the task in `[data]`; the model in
`[model.arch]`. The progress bar shows the loss and two teacher-forced accuracies on the batch: per response
token (`tok`) and whole response (`seq`, every token right: a proxy for greedy accuracy).

Legend: B batch, T tokens (prompt + response - 1), V vocab.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from minirl_async.config import Config, load_config
from minirl_async.tasks.base import Prompt, take
from minirl_async.tasks.source import make_prompt_source
from minirl_async.tasks.synthetic import noisy_solution
from minirl_async.tasks.tokenizer import Tokenizer, load_tokenizer


def sft_batch(prompts: list[Prompt], tok: Tokenizer, slip: float = 0.0,
              rng: random.Random | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids_BT, target_ids_BT, loss_mask_BT): next-token targets, mask True on response targets.
    With `slip` > 0 the targets are worked solutions with slips (`synthetic.noisy_solution`)."""
    seqs, starts = [], []
    rng = rng or random.Random(0)
    for p in prompts:
        if p.solution is None:
            raise ValueError(f"prompt {p.uid!r} has no 'solution': cold-start SFT needs worked solutions "
                             "(synthetic tasks have them; JSONL lines need a 'solution' field)")
        prompt_ids = tok.encode_prompt(p)
        seqs.append(prompt_ids + tok.encode_response(noisy_solution(p, rng, slip)))
        starts.append(len(prompt_ids))
    T = max(len(s) for s in seqs) - 1
    inp_BT = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    tgt_BT = torch.full((len(seqs), T), tok.pad_id, dtype=torch.long)
    mask_BT = torch.zeros(len(seqs), T, dtype=torch.bool)
    for i, (s, st) in enumerate(zip(seqs, starts)):
        n = len(s) - 1
        inp_BT[i, :n] = torch.tensor(s[:-1])
        tgt_BT[i, :n] = torch.tensor(s[1:])
        mask_BT[i, st - 1:n] = True  # the target at position st-1 is the first response token
    return inp_BT, tgt_BT, mask_BT


def build_model(cfg: Config, tok: Tokenizer) -> tuple[torch.nn.Module, Any]:
    """A fresh model of `model.arch` sized to the tokenizer, or the checkpoint at `model.path`."""
    from minirl_async.models.config import ModelConfig
    from minirl_async.models.hf_io import load_hf
    from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

    if cfg.model.path:
        model, mcfg = load_hf(cfg.model.path, dtype=torch.float32)
        return model, mcfg
    mcfg = ModelConfig.from_arch(cfg.model.arch, tok.vocab_size, bos_token_id=tok.bos_id,
                                 eos_token_id=tok.eos_id, pad_token_id=tok.pad_id)
    torch.manual_seed(cfg.model.init_seed)
    return Qwen3MoeForCausalLM(mcfg), mcfg


def _lr_at(step: int, total: int, peak: float) -> float:
    warm = max(1, total // 20)
    if step < warm:
        return peak * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(frac, 1.0))))


def train_sft(cfg: Config, out_dir: str | Path | None = None, progress: bool = True) -> dict[str, Any]:
    """Run cold-start SFT and save the checkpoint; returns a summary (steps, seconds, final loss/accuracy)."""
    prev_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.data.sft.threads)
    try:
        return _train_sft(cfg, out_dir, progress)
    finally:
        torch.set_num_threads(prev_threads)  # the launcher calls us in-process before it evaluates


def _train_sft(cfg: Config, out_dir: str | Path | None, progress: bool) -> dict[str, Any]:
    from minirl_async.models.hf_io import save_hf
    from minirl_async.progress import progress_bar

    s = cfg.data.sft
    out = Path(out_dir) if out_dir else Path(cfg.run.dir) / "sft"
    tok = load_tokenizer(cfg)
    model, mcfg = build_model(cfg, tok)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, betas=(0.9, 0.98), weight_decay=0.0)
    source = make_prompt_source(cfg, "train")
    slip_rng = random.Random(f"slip:{cfg.data.seed}")
    t0 = time.monotonic()
    bar = progress_bar(range(s.steps), desc="sft", enabled=progress)
    ema: dict[str, float] = {}
    step = 0
    for step in bar:
        elapsed = time.monotonic() - t0
        if elapsed > s.max_minutes * 60:
            bar.write(f"sft: stopping at step {step}: data.sft.max_minutes = {s.max_minutes} reached")
            break
        # The schedule follows the planned steps, or the wall-clock budget when that is the tighter one.
        planned = s.steps if step < 20 else min(s.steps, int(step * s.max_minutes * 60 / max(elapsed, 1e-6)))
        lr = _lr_at(step, max(planned, step + 1), s.lr)
        for g in opt.param_groups:
            g["lr"] = lr
        inp_BT, tgt_BT, mask_BT = sft_batch(take(source, s.batch_size), tok, s.slip, slip_rng)
        logits_BTV = model(inp_BT)
        loss = F.cross_entropy(logits_BTV[mask_BT].float(), tgt_BT[mask_BT])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.learner.grad_clip)
        opt.step()
        with torch.no_grad():
            right_BT = (logits_BTV.argmax(-1) == tgt_BT) | ~mask_BT
            tok_acc = right_BT[mask_BT].float().mean().item()
            seq_acc = right_BT.all(-1).float().mean().item()
        for k, v in (("loss", loss.item()), ("tok", tok_acc), ("seq", seq_acc)):
            ema[k] = v if k not in ema else 0.9 * ema[k] + 0.1 * v
        bar.set_postfix(loss=f"{ema['loss']:.3f}", tok=f"{ema['tok']:.3f}", seq=f"{ema['seq']:.2f}", lr=f"{lr:.1e}",
                        refresh=False)   # shown at the next refresh (in a log: a line every few seconds)
    else:
        step = s.steps
    bar.close()
    seconds = time.monotonic() - t0
    model.eval()
    save_hf(model, mcfg, out)
    tok.save(out)
    summary = {"checkpoint": str(out), "steps": step, "seconds": round(seconds, 1),
               "loss": round(ema.get("loss", float("nan")), 4), "tok_acc": round(ema.get("tok", 0.0), 4),
               "seq_acc_teacher_forced": round(ema.get("seq", 0.0), 4),
               "num_params": sum(p.numel() for p in model.parameters())}
    (out / "sft_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def main(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    summary = train_sft(cfg, args.out, progress=cfg.run.progress)
    print(json.dumps(summary))
    return 0
