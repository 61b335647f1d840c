"""The MiniRL train step: advantages -> proximal forward -> N minibatch updates -> metrics (ALGORITHM.md).

Construction (every rank; under torchrun call `init_distributed()` first):

    from minirl_async.learner import Trainer
    trainer = Trainer.from_config(cfg)                     # builds the model from cfg.model (path or arch)
    trainer = Trainer(cfg, model)                           # or wrap a model you built/loaded yourself
    metrics = trainer.train_step(groups, replay_mode="r2")  # groups: list[Group] (Group.from_scored(sg))
    for name, tensor in trainer.iter_full_state(): ...      # every rank iterates; rank 0 publishes
    trainer.save_checkpoint(run_dir / "checkpoints", extra={"controller": ...})
    extra = trainer.load_latest(run_dir / "checkpoints")    # None when there is none

With several ranks every rank must call `train_step` with the SAME list of groups (rank 0 receives them and
broadcasts, e.g. `broadcast_groups`); each rank trains on its share of every minibatch (group j of a
minibatch goes to rank j % world_size), gradients are averaged by FSDP, metrics are all-reduced, so every
rank returns the same metrics dict.

One step, for `replay_mode` in {"none", "r2", "r3"} (ALGORITHM.md §5):
1. validate every group (BatchError names the bad group), advantages per group (std-normalised for grpo /
   cispo, see algo.advantages);
2. split the groups IN THE GIVEN ORDER into N = len(groups) / minibatch_groups minibatches (no shuffle:
   the order is the controller's, so minibatch k and the lag metrics agree, and runs are reproducible);
3. proximal forward of every minibatch: RECORD (none, r2) or REPLAY the sampler's routes (r3); log pi_prox,
   full-vocabulary entropy, train-inference KL; routing agreement learner vs sampler from a free-routing
   forward (the RECORD pass itself for none/r2, one extra forward for r3). Minibatches 2..N without
   gradients before any update; minibatch 1's is its update's own forward (it runs at theta_old: the same
   numbers, and a RECORD forward computes what free routing does), which saves a forward per token;
4. N updates: forward with the replayed routes (r2: recorded, r3: sampler's; none: free), loss, backward,
   global-norm clip, AdamW, lr schedule. A non-finite loss or gradient norm skips the update (weights and
   optimizer state unchanged) and counts it in `train/skipped_updates`;
5. one more no-grad forward for `kl/staleness_k3` between the new weights and pi_prox.

Legend: B samples, T positions, L MoE layers, K top-k.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minirl_async.algo.advantages import group_advantages, needs_std_advantages
from minirl_async.algo.logprobs import chunked_logprobs
from minirl_async.algo.losses import LossConfig, compute_policy_loss
from minirl_async.algo.metrics import routing_agreement, staleness_kl, train_infer_kl
from minirl_async.config import Config
from minirl_async.learner.batch import Batch, BatchError, Group, collate, validate_group
from minirl_async.learner.fsdp import apply_fsdp, full_tensor, iter_full_state, rank_world
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM
from minirl_async.models.routing import Routing

log = logging.getLogger(__name__)

REPLAY_MODES = ("none", "r2", "r3")


class PolicyLogprobs(nn.Module):
    """Model + chunked LM head as ONE module, so the FSDP root unit (embedding, norm, LM head) stays
    gathered while the log-probs are computed from the hidden states."""

    def __init__(self, model: Qwen3MoeForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids_BT: torch.Tensor, targets_BT: torch.Tensor, routing: Routing | None,
                temperature: float, chunk: int, with_entropy: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        h_BTD = self.model.forward_hidden(input_ids_BT, routing=routing)
        return chunked_logprobs(h_BTD, self.model.lm_head.weight, targets_BT, temperature, chunk, with_entropy)


def lr_lambda(warmup: int, total: int, schedule: str) -> Any:
    """Multiplier of the peak lr at update u: linear warm-up (u+1)/(warmup+1) for u < warmup, then 1
    (constant) or a cosine from 1 to 0 over the remaining `total - warmup` updates."""
    def f(u: int) -> float:
        if u < warmup:
            return (u + 1) / (warmup + 1)
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (u - warmup) / max(1, total - warmup))
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


class Trainer:
    """Rank-local trainer of one policy (see the module docstring)."""

    def __init__(self, cfg: Config, model: Qwen3MoeForCausalLM) -> None:
        lc = cfg.learner
        self.cfg = cfg
        self.mcfg = model.config
        self.rank, self.world = rank_world()
        self.device = torch.device(lc.device)
        self.loss_cfg = LossConfig.from_algo(cfg.algo)
        self.temperature = cfg.sampler.temperature if cfg.sampler.temperature > 0 else 1.0
        self.chunk = lc.logprob_chunk
        self.num_minibatch_groups = lc.minibatch_groups
        if lc.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")   # cuBLAS needs it to be deterministic
            torch.use_deterministic_algorithms(True)
        # Master weights: fp32 (fp64 models, used by the numerical tests, stay fp64).
        if model.lm_head.weight.dtype not in (torch.float32, torch.float64):
            model = model.float()
        model.to(self.device)
        self.model = model
        bf16 = lc.compute_dtype == "bf16" and model.lm_head.weight.dtype == torch.float32
        self.policy: nn.Module = PolicyLogprobs(model)
        if bf16 and not dist.is_initialized():
            # One process with bf16 compute: FSDP2 on a world-size-1 group (in-memory store, no port) gives
            # bf16 compute over fp32 master weights through the same code path as several ranks.
            # (torch.autocast is not an option: the MoE block mixes its dtypes under autocast.)
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(),
                                    rank=0, world_size=1)
        if dist.is_available() and dist.is_initialized():
            apply_fsdp(self.policy, list(model.model.layers), torch.bfloat16 if bf16 else None,
                       self.device.type)
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lc.lr, betas=lc.betas, weight_decay=lc.weight_decay)
        total = lc.num_steps * cfg.num_minibatches
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(lc.warmup_steps, total, lc.lr_schedule))
        self.version = 0
        """Completed train steps."""
        self.skipped_updates = 0
        """Updates skipped because the loss or gradient was not finite (cumulative)."""

    @classmethod
    def from_config(cls, cfg: Config, hf_folder: str | None = None) -> Trainer:
        """Load `hf_folder` (default `run.sft_checkpoint` or `model.path`), or build `model.arch` from scratch
        with `model.init_seed` when neither is set (then `model.arch.vocab_size` must be > 0)."""
        from minirl_async.models.config import ModelConfig
        from minirl_async.models.hf_io import load_hf

        folder = hf_folder or cfg.run.sft_checkpoint or cfg.model.path
        if folder:
            model, _ = load_hf(folder, dtype=torch.float32)
        else:
            if cfg.model.arch.vocab_size <= 0:
                raise ValueError("model.arch.vocab_size is 0: give a checkpoint (model.path) or a vocab size")
            torch.manual_seed(cfg.model.init_seed)
            model = Qwen3MoeForCausalLM(ModelConfig.from_arch(cfg.model.arch, cfg.model.arch.vocab_size))
        return cls(cfg, model)

    # ---- forward helpers ------------------------------------------------------------------------------
    def _logprobs(self, b: Batch, routing: Routing | None,
                  with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.policy(b.input_ids_BT, b.targets_BT, routing, self.temperature, self.chunk, with_entropy)

    def invalid_groups(self, groups: Sequence[Group]) -> dict[str, str]:
        """`{group_id: reason}` for the groups `train_step` would reject (empty when all are fine), so a
        caller can drop and re-issue them before the step instead of catching `BatchError`."""
        m = self.mcfg
        bad = {}
        for g in groups:
            try:
                validate_group(g, vocab_size=m.vocab_size, num_experts=m.num_experts,
                               num_moe_layers=m.num_moe_layers, top_k=m.num_experts_per_tok)
            except BatchError as e:
                bad[g.group_id] = str(e)
        return bad

    def _batches(self, groups: Sequence[Group]) -> list[list[Batch]]:
        """Validate, compute advantages, and split into minibatches (in order) of this rank's micro-batches."""
        m = self.mcfg
        for g in groups:
            validate_group(g, vocab_size=m.vocab_size, num_experts=m.num_experts,
                           num_moe_layers=m.num_moe_layers, top_k=m.num_experts_per_tok)
        mb = self.num_minibatch_groups
        if not groups or len(groups) % mb:
            raise ValueError(f"{len(groups)} groups is not a positive multiple of learner.minibatch_groups ({mb})")
        if mb % self.world:
            raise ValueError(f"learner.minibatch_groups ({mb}) must be a multiple of the learner world size "
                             f"({self.world}) so every rank gets whole groups")
        norm = needs_std_advantages(self.loss_cfg.name)
        pad = m.pad_token_id if m.pad_token_id is not None else 0
        out = []
        for k in range(len(groups) // mb):
            mine = list(groups[k * mb:(k + 1) * mb])[self.rank::self.world]
            samples, adv = [], []
            for g in mine:
                samples += g.samples
                adv += group_advantages(g.rewards[None], normalize_std=norm)[0].tolist()
            # every rank must run the same number of forwards (FSDP collectives): agree on the count
            micro = self.cfg.learner.micro_batch_size or len(samples)
            n_micro = int(self._allreduce([float(math.ceil(len(samples) / micro))],
                                          dist.ReduceOp.MAX if self.world > 1 else None)[0])
            if n_micro > len(samples):
                raise ValueError(f"minibatch {k}: {len(samples)} responses on rank {self.rank} cannot fill "
                                 f"{n_micro} micro-batches; use groups of equal size")
            bounds = [round(i * len(samples) / n_micro) for i in range(n_micro + 1)]
            out.append([collate(samples[a:b], adv[a:b], pad_id=pad).to(self.device)
                        for a, b in zip(bounds[:-1], bounds[1:])])
        return out

    # ---- reductions over ranks -----------------------------------------------------------------------
    def _allreduce(self, values: list[float], op: Any = None) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t.tolist()

    # ---- the step ------------------------------------------------------------------------------------
    def train_step(self, groups: Sequence[Group], replay_mode: str = "none") -> dict[str, float]:
        """One global step on whole groups (len(groups) = N * learner.minibatch_groups). Returns the §7
        metrics the learner owns plus loss/grad/lr figures. Raises BatchError for bad groups (before any
        weight changes) and ValueError for a bad replay mode or r3 without sampler routes."""
        if replay_mode not in REPLAY_MODES:
            raise ValueError(f"replay_mode must be one of {REPLAY_MODES}, got {replay_mode!r}")
        t0 = time.perf_counter()
        minibatches = self._batches(groups)
        flat = [b for mbs in minibatches for b in mbs]
        # Every rank must take the same branches (they contain collectives): routes count only if all have them.
        has_routes = bool(self._allreduce([float(all(b.routes_BTLK is not None for b in flat))],
                                          dist.ReduceOp.MIN if self.world > 1 else None)[0])
        if replay_mode == "r3" and not has_routes:
            raise ValueError("replay_mode 'r3' needs the sampler's routes for every response "
                             "(set sampler.capture_routes = true)")
        sums: dict[str, float] = {}   # token-weighted sums of means, aggregated at the end

        def acc(metrics: dict[str, float], weight: float) -> None:
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * weight

        # 3. proximal pass (per micro-batch; results kept by identity of the Batch object). The first
        # minibatch's updates run at theta_old itself, so their forward (with gradients) doubles as its
        # proximal pass (`proximal` below, called from the update loop): one forward per token saved, the
        # same numbers (the forward is deterministic, and RECORD routing computes what free routing does).
        prox: dict[int, torch.Tensor] = {}
        replay: dict[int, torch.Tensor | None] = {}

        def proximal(b: Batch) -> torch.Tensor:
            """Log-probs at theta_old (with gradients when called in the update loop) and the pass's metrics."""
            rt = Routing("replay", replay_BTLK=b.routes_BTLK) if replay_mode == "r3" else Routing("record")
            lp_BT, ent_BT = self._logprobs(b, rt, with_entropy=True)
            assert ent_BT is not None
            prox[id(b)] = lp_BT.detach()
            nt, nv = float(b.response_mask_BT.sum()), float(b.valid_BT.sum())
            with torch.no_grad():
                acc(train_infer_kl(prox[id(b)], b.rollout_logprobs_BT, b.response_mask_BT), nt)
                acc({"policy/entropy": float((ent_BT.detach().double() * b.response_mask_BT).sum()) / max(nt, 1)},
                    nt)
                if has_routes:
                    assert b.routes_BTLK is not None
                    if replay_mode == "r3":
                        rt = Routing("record")
                        self._logprobs(b, rt)
                    assert rt.recorded_BTLK is not None
                    acc(routing_agreement(rt.recorded_BTLK, b.routes_BTLK, b.valid_BT,
                                          self.mcfg.moe_layer_ids), nv)
            replay[id(b)] = {"none": None, "r2": rt.recorded_BTLK if replay_mode == "r2" else None,
                             "r3": b.routes_BTLK}[replay_mode]
            return lp_BT

        self.policy.eval()
        with torch.no_grad():
            for b in flat[len(minibatches[0]):]:
                proximal(b)

        def routing_of(b: Batch) -> Routing | None:
            r = replay[id(b)]
            return Routing("replay", replay_BTLK=r) if r is not None else None

        # 4. updates; the normalisers are global (all ranks and micro-batches of this minibatch), so the
        # per-micro-batch, per-rank losses add up exactly to the minibatch loss
        self.policy.train()
        grad_norms, losses, lrs = [], [], []
        skipped_before = self.skipped_updates
        # The optimizer's own (sharded) parameters: under FSDP2, module attributes can point at the
        # temporary unsharded copies between forward and backward, which never hold the gradients.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for k, mbs in enumerate(minibatches):
            n_seq, n_tok = self._allreduce([float(sum(b.input_ids_BT.shape[0] for b in mbs)),
                                            float(sum(b.num_tokens for b in mbs))])
            self.optimizer.zero_grad(set_to_none=True)
            loss_local = 0.0
            for b in mbs:
                lp_BT = proximal(b) if k == 0 else self._logprobs(b, routing_of(b))[0]
                loss, m = compute_policy_loss(lp_BT, prox[id(b)], b.rollout_logprobs_BT, b.advantages_B,
                                              b.response_mask_BT, self.loss_cfg, num_seqs=n_seq, num_tokens=n_tok)
                # FSDP averages gradients over ranks; scaling by world turns that average into the global sum.
                (loss * self.world).backward()
                loss_local += m["loss/policy"]
                nt = float(b.num_tokens)
                acc({"loss/clip_frac": m["loss/clip_frac"], "is/d_mean": m["is/d_mean"],
                     "is/trunc_frac": m["is/trunc_frac"]}, nt)
                sums["is/d_max"] = max(sums.get("is/d_max", 0.0), m["is/d_max"])
            gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.learner.grad_clip, foreach=True)
            gn_f = float(full_tensor(gn))
            loss_f = self._allreduce([loss_local])[0]
            lrs.append(self.scheduler.get_last_lr()[0])
            if not (math.isfinite(loss_f) and math.isfinite(gn_f)):
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_updates += 1
                log.warning("step %d update %d skipped: loss %s, grad norm %s (weights unchanged)",
                            self.version, k, loss_f, gn_f)
            else:
                self.optimizer.step()
                self.scheduler.step()
            grad_norms.append(gn_f)
            losses.append(loss_f)
        self.optimizer.zero_grad(set_to_none=True)
        # 5. staleness KL of the new weights against pi_prox (same routing as the updates)
        self.policy.eval()
        with torch.no_grad():
            for b in flat:
                lp_BT, _ = self._logprobs(b, routing_of(b))
                acc(staleness_kl(lp_BT, prox[id(b)], b.response_mask_BT), float(b.num_tokens))
        self.version += 1
        n_resp = sum(float(b.response_mask_BT.sum()) for b in flat)
        n_valid = sum(float(b.valid_BT.sum()) for b in flat)
        return self._finish_metrics(sums, n_resp, n_valid, losses, grad_norms, lrs,
                                    self.skipped_updates - skipped_before, time.perf_counter() - t0)

    def _finish_metrics(self, sums: dict[str, float], n_resp: float, n_valid: float, losses: list[float],
                        grad_norms: list[float], lrs: list[float], skipped: int, elapsed: float) -> dict[str, float]:
        d_max = sums.pop("is/d_max", 0.0)
        keys = sorted(sums)
        totals = self._allreduce([sums[k] for k in keys] + [n_resp, n_valid])
        n_resp_all, n_valid_all = totals[-2], totals[-1]
        out: dict[str, float] = {}
        for k, v in zip(keys, totals):
            weight = n_valid_all if k.startswith("routing/") else n_resp_all
            out[k] = v / max(weight, 1.0)
        out["is/d_max"] = self._allreduce([d_max], dist.ReduceOp.MAX if self.world > 1 else None)[0]
        out["loss/policy"] = sum(losses) / len(losses)
        out["loss/grad_norm"] = sum(grad_norms) / len(grad_norms)
        out["loss/grad_norm_max"] = max(grad_norms)
        out["optim/lr"] = lrs[-1]
        out["train/skipped_updates"] = float(skipped)
        out["train/num_updates"] = float(len(losses))
        # every position of the input is forwarded and back-propagated, prompt included
        out["perf/train_tok_s"] = n_valid_all / max(elapsed, 1e-9)
        return out

    # ---- weights and checkpoints ---------------------------------------------------------------------
    def reshard(self) -> None:
        """Put the sharded fp32 master parameters back on the modules. FSDP2 keeps the ROOT unit (embedding,
        final norm, LM head) unsharded after a forward, so until the next backward its module attributes are
        the compute-dtype (bf16) copies; reading weights through `self.model` must call this first."""
        reshard = getattr(self.policy, "reshard", None)
        if reshard is not None:
            reshard()

    def iter_full_state(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`(hf_name, full fp32 tensor)` one parameter at a time; every rank must iterate (collectives)."""
        self.reshard()
        return iter_full_state(self.model)

    def save_checkpoint(self, root: str | Path, extra: dict[str, Any] | None = None) -> Path | None:
        """Atomic checkpoint `root/step_{version:08d}` (keeps `learner.keep_last`); see checkpoint.py."""
        from minirl_async.learner.checkpoint import save_checkpoint

        return save_checkpoint(self, root, extra or {}, keep_last=self.cfg.learner.keep_last)

    def load_latest(self, root: str | Path) -> dict[str, Any] | None:
        """Restore the newest complete checkpoint under `root`; returns its `extra` (None if there is none)."""
        from minirl_async.learner.checkpoint import load_latest

        return load_latest(self, root)

    def export_hf(self, folder: str | Path) -> Path:
        """HF folder (config.json + safetensors) of the current weights, written by rank 0."""
        from minirl_async.learner.checkpoint import export_hf

        return export_hf(self, folder)
