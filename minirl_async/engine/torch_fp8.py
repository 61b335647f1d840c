"""The embedded sampler engine: pure PyTorch, block-FP8 weights, continuous batching, routed-expert capture.

    eng = TorchFP8Engine(model_cfg, fp8=True, fp8_block=32, dtype=torch.bfloat16, max_batch_size=16)
    eng.update_weights(0, iter_hf_state(model))            # HF names; FP8 + scales or plain weights
    out = eng.generate([GenerateRequest([3, 4, 5], SamplingParams(n=8, seed=1, max_new_tokens=32))])

How a batch runs (`generate`, blocking, one caller thread at a time; see base.py for the threading rules):
- Requests are validated; bad ones come back as 'abort' rollouts with `error` set, the rest are expanded
  into `n` sequences each and queued.
- Loop: admit queued sequences into free slots (continuous batching: a finished sequence frees its slot for
  the next step); prefill each admitted distinct prompt once (right-padded batch, causal attention) and
  copy its KV rows and prompt routes to the request's other samples; then one decode step for every active
  slot, with a per-row position and an attention mask over the slot's own written positions.
- Sampling: `sampling.sample_tokens` with one uniform per row from the sequence's own seeded stream, so
  nothing random depends on what shares the batch (tokens are exactly batch-independent in float64; in bf16
  the batch shape changes kernel rounding, see `SamplingParams.seed`). The recorded logprob is the log-prob
  under the distribution sampled from: `log_softmax(logits / T)[token]` (T = 1 when greedy) minus log of
  the kept mass when top-p/top-k truncate (sampling.py).
- Routes: prefill runs the model in RECORD mode, decode (fast_decode.py) returns its own top-k indices (the
  same experts, tested against RECORD in float64); both are written into a per-slot buffer at the tokens'
  positions, so a finished sequence's routes are rows `0 .. P+R-2` (SGLang layout). `capture_routes=False`
  skips the recording and returns None (the attribute may be switched between generate calls).
- Weights: `update_weights` validates and dequantises outside any lock (weights.py), then swaps every
  parameter at a version boundary: after the running batch, or, in interruptible mode, between two
  decode steps (tokens record the version that produced them). `pause()` holds the loop at the next step
  boundary; an update goes in while paused only between batches, or mid-batch in interruptible mode.

Numerics: linear projections hold the values of block-FP8 weights (`float8_e4m3fn` x `weight_scale_inv`)
cached in the compute dtype (weights.py explains why cached); embeddings, norms, router and lm_head stay in
the compute dtype, as in SGLang's FP8 Qwen3-MoE. `fp8=False` keeps plain weights (tests use float64).
Measured gap to the bf16 learner (tests/engine, tiny model, block 8, 256 sampled tokens): mean |delta
logprob| 0.034, KL(mu || pi) 9e-4 nats/token; without FP8 the bf16 engine's gap is 0.003 and ~0.

Speed (bench sampler, 1 CPU thread, bf16, batch 16): ~2-2.5x Hugging Face `generate()` on the same
weights, route capture costs ~0-3%. The decode step is bound by per-op cost (~5-20 us per small CPU op,
~25 ops per layer), not by flops or weight traffic; fast_decode.py lists what was tried. Sampling takes a
shorter path when no active row is greedy or truncated (`sampling.sample_tokens(plain=True)`).

Legend: B active rows, T tokens, S key positions, V vocab, L MoE layers, K top-k, P prompt, R response.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from minirl_async.engine.base import (
    GenerateRequest,
    NamedTensors,
    Rollout,
    SamplingParams,
    WeightUpdateError,
    aborted,
    check_version,
)
from minirl_async.engine.fast_decode import Packed, decode_step, pack_params, rope_table
from minirl_async.engine.kv_cache import SlotKVCache
from minirl_async.engine.sampling import sample_tokens
from minirl_async.engine.weights import prepare_update
from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM
from minirl_async.models.routing import Routing, routes_dtype

if TYPE_CHECKING:
    from minirl_async.config import Config

log = logging.getLogger(__name__)
_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


@dataclass
class _Seq:
    req: int
    sample: int
    prompt: list[int]
    params: SamplingParams
    rng: random.Random
    max_new: int
    stop: frozenset[int]
    t_submit: float
    plain: bool       # temperature > 0 and no top-p/top-k truncation (sampling's fast path)
    t_start: float = 0.0
    n_gen: int = 0


class TorchFP8Engine:
    """See the module docstring. All public methods but `generate` are thread-safe."""

    def __init__(self, model_cfg: ModelConfig, *, fp8: bool = True, fp8_block: int = 128,
                 dtype: torch.dtype = torch.bfloat16, device: str = "cpu", max_batch_size: int = 64,
                 max_context: int | None = None, capture_routes: bool = True, interruptible: bool = False,
                 seed: int = 0, packed_decode: bool = True):
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        self.cfg = model_cfg
        self.fp8, self.fp8_block, self.dtype, self.device = fp8, fp8_block, dtype, torch.device(device)
        self.max_slots = max_batch_size
        # Cache, token buffers and rope table are preallocated for max_slots x max_context positions, so a
        # real model's max_position_embeddings (tens of thousands) must not be the default in production:
        # set sampler.max_context.
        self.max_context = max_context or model_cfg.max_position_embeddings
        if not 2 <= self.max_context <= model_cfg.max_position_embeddings:
            raise ValueError(f"sampler.max_context={self.max_context}: must be in 2..{model_cfg.max_position_embeddings}"
                             " (model max_position_embeddings), or 0 for the model's limit")
        self.interruptible = interruptible
        self.packed_decode = packed_decode  # fast_decode.py; False: decode through the model's own forward
        self._packed: Packed | None = None
        self._seed_rng = random.Random(seed)  # seeds of unseeded requests
        self.model = Qwen3MoeForCausalLM(model_cfg).to(device=self.device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self._version = -1
        # reset() forgets the version number (the floor for the next update), not the loaded weights: those
        # keep serving, and their tokens keep the version they were published as (wire versions are >= 0).
        self._has_weights = False
        self._weights_version = -1
        S, C, dev = self.max_slots, self.max_context, self.device
        self.cache = SlotKVCache(model_cfg.num_hidden_layers, S, model_cfg.num_key_value_heads, C,
                                 model_cfg.head_dim, dtype, dev)
        # Per-slot state; rows 0..n-1 are the active sequences (compacted on finish).
        self._last = torch.zeros(S, dtype=torch.long, device=dev)     # token to feed next
        self._pos = torch.zeros(S, dtype=torch.long, device=dev)      # its position
        self._temp = torch.ones(S, dtype=torch.float32, device=dev)
        self._top_p = torch.ones(S, dtype=torch.float64, device=dev)     # float64: top_p=0.9 stays 0.9
        self._top_k = torch.zeros(S, dtype=torch.long, device=dev)
        self._tok = torch.zeros(S, C, dtype=torch.long)
        self._logp = torch.zeros(S, C, dtype=torch.float32)
        self._ver = torch.zeros(S, C, dtype=torch.long)
        self._routes: torch.Tensor | None = None  # [S, C, L, K] routed experts while capture is on
        self._arange_C = torch.arange(C, device=dev)
        self._rope = rope_table(model_cfg, C, dtype, dev)
        # Version-boundary coordination between the generate thread and updaters / pause.
        self._cv = threading.Condition()
        self._busy = False           # a step is running: weights must not change
        self._generating = False     # a generate call is in progress (one at a time)
        self._swap_pending = 0
        self._paused = False
        self._stats = {"requests": 0, "refused_requests": 0, "tokens": 0, "updates": 0, "refused_updates": 0}
        self._running = 0
        self._waiting = 0
        self.capture_routes = capture_routes

    @classmethod
    def from_config(cls, cfg: Config, model_cfg: ModelConfig, index: int = 0) -> TorchFP8Engine:
        """The engine of sampler `index`: seeds of unseeded requests from run.seed * 1000 + index (as the
        fake and SGLang engines), so two samplers never draw the same ones."""
        s = cfg.sampler
        return cls(model_cfg, fp8=s.fp8, fp8_block=cfg.model.fp8_block_size, dtype=_DTYPES[s.compute_dtype],
                   device=s.device, max_batch_size=s.max_batch_size, max_context=s.max_context or None,
                   capture_routes=s.capture_routes,
                   interruptible=s.interruptible, seed=cfg.run.seed * 1000 + index)

    # ------------------------------------------------------------------------------------ control plane
    @property
    def version(self) -> int:
        return self._version

    def update_weights(self, version: int, named_tensors: NamedTensors) -> None:
        try:
            check_version(version, self._version)
            new = prepare_update(self.cfg, named_tensors, fp8=self.fp8, block=self.fp8_block, dtype=self.dtype,
                                 device=self.device)
        except WeightUpdateError:
            self._stats["refused_updates"] += 1
            raise
        packed, new = pack_params(self.cfg, new)   # model parameters become views into the packed weights
        params = dict(self.model.named_parameters())
        assert set(params) == set(new), sorted(set(params) ^ set(new))[:5]
        with self._cv:
            self._swap_pending += 1
            try:
                while self._busy:
                    self._cv.wait()
                try:
                    check_version(version, self._version)   # a concurrent update may have got there first
                except WeightUpdateError:
                    self._stats["refused_updates"] += 1
                    raise
                for name, p in params.items():
                    p.data = new[name]
                self._packed = packed
                self._version = version
                self._has_weights = True
                self._weights_version = version
                self._stats["updates"] += 1
            finally:
                self._swap_pending -= 1
                self._cv.notify_all()

    def pause(self) -> None:
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def reset(self) -> None:
        """Forget the version number (learner rollback); the loaded weights keep serving until the next
        update, whose version may then be anything >= 0. Tokens sampled meanwhile carry the version the loaded
        weights arrived as."""
        with self._cv:
            self._version = -1

    @property
    def capture_routes(self) -> bool:
        """Whether rollouts carry routed experts; may be switched between generate calls."""
        return self._routes is not None

    @capture_routes.setter
    def capture_routes(self, on: bool) -> None:
        with self._cv:
            if self._generating:
                raise RuntimeError("capture_routes cannot change while generate is running")
            L, K = self.cfg.num_moe_layers, self.cfg.num_experts_per_tok
            if not (on and L > 0):
                self._routes = None
            elif self._routes is None:
                rdt = routes_dtype(max(self.cfg.num_experts, 1))
                self._routes = torch.zeros(self.max_slots, self.max_context, L, K, dtype=rdt)

    def health(self) -> dict[str, Any]:
        return {"engine": "torch_fp8", "version": self._version, "has_weights": self._has_weights, "paused": self._paused, "busy": self._busy,
                "running": self._running, "waiting": self._waiting, "fp8": self.fp8,
                "dtype": str(self.dtype).removeprefix("torch."), "capture_routes": self.capture_routes,
                **self._stats}

    def _enter(self) -> None:
        with self._cv:
            if self._generating:
                raise RuntimeError("generate is already running in another thread; call it from one worker")
            self._generating = True
            while self._paused or self._swap_pending:
                self._cv.wait()
            self._busy = True

    def _leave(self) -> None:
        with self._cv:
            self._busy = self._generating = False
            self._cv.notify_all()

    def _boundary(self) -> None:
        """Between two steps: honour pause, and in interruptible mode let a pending update swap in. Paused
        mid-batch, a non-interruptible engine stays busy: an update still waits for the end of the batch (a
        response never mixes versions)."""
        with self._cv:
            swap = self.interruptible
            if self._paused or (swap and self._swap_pending):
                self._busy = not swap
                self._cv.notify_all()
                while self._paused or (swap and self._swap_pending):
                    self._cv.wait()
                self._busy = True

    # ------------------------------------------------------------------------------------ generation
    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Rollout]]:
        if not self._has_weights:
            raise RuntimeError("torch_fp8 engine has no weights yet: call update_weights(version, tensors) first")
        t0 = time.perf_counter()
        out: list[list[Rollout | None]] = []
        queue: deque[_Seq] = deque()
        for r, req in enumerate(requests):
            self._stats["requests"] += 1
            try:
                prompt = req.check(self.cfg.vocab_size, self.max_context)
            except ValueError as e:
                self._stats["refused_requests"] += 1
                bad = _prompt_or_empty(req)
                out.append([aborted(bad, f"request {req.request_id or r}: {e}")
                            for _ in range(max(int(req.params.n) if isinstance(req.params.n, int) else 1, 1))])
                continue
            p = req.params
            out.append([None] * p.n)
            base = p.seed if p.seed is not None else self._seed_rng.getrandbits(63)
            # (the temperature as the engine stores it: float32, where a tiny one is 0, i.e. greedy)
            plain = (float(torch.tensor(p.temperature, dtype=torch.float32)) > 0 and p.top_p >= 1
                     and not 0 < p.top_k < self.cfg.vocab_size)
            for j in range(p.n):
                # (base + j) mod 2**64: Random(-k) is Random(k), so seeds -1 .. 1 would repeat a sample
                queue.append(_Seq(r, j, prompt, p, random.Random((base + j) % 2 ** 64),
                                  min(p.max_new_tokens, self.max_context - len(prompt)),
                                  frozenset(p.stop_token_ids), t0, plain))
        self._enter()
        try:
            with torch.inference_mode():
                self._run(queue, out)
        finally:
            self._running = self._waiting = 0
            self._leave()
        assert all(x is not None for row in out for x in row)
        return [[x for x in row if x is not None] for row in out]

    def _run(self, queue: deque[_Seq], out: list[list[Rollout | None]]) -> None:
        active: list[_Seq] = []
        while queue or active:
            self._boundary()
            if queue and len(active) < self.max_slots:
                self._admit(queue, active, out)
            if active:
                self._decode(active, out)
            self._running, self._waiting = len(active), len(queue)

    def _admit(self, queue: deque[_Seq], active: list[_Seq], out: list[list[Rollout | None]]) -> None:
        take = [queue.popleft() for _ in range(min(len(queue), self.max_slots - len(active)))]
        # Slots: first one sample per distinct request (prefilled together, contiguous), then the others.
        firsts: dict[int, _Seq] = {}
        for s in take:
            firsts.setdefault(s.req, s)
        order = list(firsts.values()) + [s for s in take if firsts[s.req] is not s]
        n0, u = len(active), len(firsts)
        now = time.perf_counter()
        for s in order:
            s.t_start = now
        lens = [len(s.prompt) for s in firsts.values()]
        T = max(lens)
        ids_UT = torch.zeros(u, T, dtype=torch.long)
        for i, s in enumerate(firsts.values()):
            ids_UT[i, : len(s.prompt)] = torch.tensor(s.prompt)
        ids_UT = ids_UT.to(self.device)
        self.cache.bind(slice(n0, n0 + u), torch.zeros(u, dtype=torch.long), T, T)
        routing = Routing("record") if self.capture_routes else None
        pos_UT = torch.arange(T, device=self.device).expand(u, T)
        h_UTD = self.model.forward_hidden(ids_UT, pos_UT, routing=routing, kv_cache=self.cache)
        lens_U = torch.tensor(lens, device=self.device)
        logits_UV = self.model.lm_head(h_UTD[torch.arange(u, device=self.device), lens_U - 1])
        slot_of_req = {s.req: n0 + i for i, s in enumerate(firsts.values())}
        src_row: list[int] = []
        for k, s in enumerate(order):
            slot, src = n0 + k, slot_of_req[s.req]
            src_row.append(src - n0)
            P = len(s.prompt)
            if self._routes is not None:
                assert routing is not None and routing.recorded_BTLK is not None
                self._routes[slot, :P] = routing.recorded_BTLK[src - n0, :P].cpu()
            if slot != src:
                self.cache.move(src, slot, P)
            self._pos[slot] = P
            self._temp[slot] = float(s.params.temperature)
            self._top_p[slot] = float(s.params.top_p)
            self._top_k[slot] = int(s.params.top_k)
        active.extend(order)
        rows = slice(n0, n0 + len(order))
        logits_BV = logits_UV[torch.tensor(src_row, device=self.device)]
        self._sample_and_finish(active, rows, logits_BV, out, advance=False)

    def _decode(self, active: list[_Seq], out: list[list[Rollout | None]]) -> None:
        n = len(active)
        pos_B = self._pos[:n]
        routes_BLK: torch.Tensor | None
        if self.packed_decode:
            assert self._packed is not None
            logits_BV, routes_BLK = decode_step(self.model, self._packed, self.cache.k, self.cache.v, self._rope,
                                                self._last[:n], pos_B, self.capture_routes)
        else:
            S = int(pos_B.max()) + 1
            mask_B11S = (self._arange_C[:S][None, :] <= pos_B[:, None])[:, None, None, :]
            self.cache.bind(slice(0, n), pos_B, 1, S)
            routing = Routing("record") if self.capture_routes else None
            logits_BV = self.model(self._last[:n, None], pos_B[:, None], routing=routing, kv_cache=self.cache,
                                   attn_mask=mask_B11S)[:, -1]
            rec = routing.recorded_BTLK if routing is not None else None
            routes_BLK = rec[:, 0] if rec is not None else None
        if self._routes is not None:
            assert routes_BLK is not None
            self._routes[torch.arange(n), pos_B.cpu()] = routes_BLK.to(self._routes.dtype).cpu()
        self._sample_and_finish(active, slice(0, n), logits_BV, out, advance=True)

    def _sample_and_finish(self, active: list[_Seq], rows: slice, logits_BV: torch.Tensor,
                           out: list[list[Rollout | None]], advance: bool) -> None:
        """Sample the next token of active[rows], record it, finish sequences, compact the slots."""
        seqs = active[rows]
        u_B = torch.tensor([s.rng.random() for s in seqs], dtype=torch.float64, device=self.device)
        tok_B, logp_B = sample_tokens(logits_BV, self._temp[rows], self._top_p[rows], self._top_k[rows], u_B,
                                      plain=all(s.plain for s in seqs))
        tok_cpu = tok_B.cpu()
        # (slot, n_gen) of each row as a flat index: index_copy_ costs less than advanced-index assignment
        at_B = torch.tensor([(rows.start + i) * self.max_context + s.n_gen for i, s in enumerate(seqs)])
        self._tok.view(-1).index_copy_(0, at_B, tok_cpu)
        self._logp.view(-1).index_copy_(0, at_B, logp_B.cpu())
        self._ver.view(-1).index_fill_(0, at_B, self._weights_version)
        self._last[rows] = tok_B
        if advance:   # decode: the sampled token goes one position further (prefill set P already)
            self._pos[rows] += 1
        done: list[tuple[int, str]] = []
        for i, (s, t) in enumerate(zip(seqs, tok_cpu.tolist())):
            s.n_gen += 1
            if t in s.stop:
                done.append((rows.start + i, "stop"))
            elif s.n_gen >= s.max_new:
                done.append((rows.start + i, "length"))
        self._stats["tokens"] += len(seqs)
        for slot, reason in sorted(done, reverse=True):   # high slots first, so moves never clobber
            self._finish(active, slot, reason, out)

    def _finish(self, active: list[_Seq], slot: int, reason: str, out: list[list[Rollout | None]]) -> None:
        s = active[slot]
        R, P = s.n_gen, len(s.prompt)
        routes = self._routes[slot, : P + R - 1].clone() if self._routes is not None else None
        out[s.req][s.sample] = Rollout(
            prompt_ids=s.prompt, response_ids=self._tok[slot, :R].clone(), logprobs=self._logp[slot, :R].clone(),
            versions=self._ver[slot, :R].clone(), routes=routes, finish_reason=reason,  # type: ignore[arg-type]
            timings={"queue_s": s.t_start - s.t_submit, "generate_s": time.perf_counter() - s.t_start})
        last = len(active) - 1
        if slot != last:   # compact: the last active sequence moves into the freed slot
            m = active[last]
            mlen = len(m.prompt) + m.n_gen
            self.cache.move(last, slot, mlen)
            for buf in (self._last, self._pos, self._temp, self._top_p, self._top_k):
                buf[slot] = buf[last]
            self._tok[slot, : m.n_gen] = self._tok[last, : m.n_gen]
            self._logp[slot, : m.n_gen] = self._logp[last, : m.n_gen]
            self._ver[slot, : m.n_gen] = self._ver[last, : m.n_gen]
            if self._routes is not None:
                self._routes[slot, :mlen] = self._routes[last, :mlen]
            active[slot] = m
        active.pop()


def _prompt_or_empty(req: GenerateRequest) -> list[int]:
    try:
        return req.prompt_list()
    except (TypeError, ValueError):
        return []
