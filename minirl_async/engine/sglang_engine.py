"""Adapter from the engine interface (base.py) to `sglang.Engine` (GPU; optional extra, imported lazily).

    eng = SGLangEngine.from_config(cfg, model_cfg, "ckpt_fp8/")      # launches sglang.Engine(...)
    rollouts = eng.generate(requests); eng.update_weights(v, named_tensors)

What SGLang is asked for (checked against the sglang source, python/sglang/srt/...):
- launch: `sglang.Engine(model_path, quantization="fp8", enable_return_routed_experts=True, tp_size,
  mem_fraction_static, **sampler.sglang.extra_args)` (server_args.py). The folder should be a block-FP8
  checkpoint (`save_hf(..., fp8_block_size=b)`), so weight updates carry the same layout.
- generate: `Engine.generate(input_ids=[...], sampling_params=[...], return_logprob=True,
  return_routed_experts=True)` (entrypoints/engine.py); one SGLang request per sample (n=1, seed + j as
  `sampling_seed`), so sample order and seeds are ours. Each output dict has `output_ids` and `meta_info`
  with `output_token_logprobs` = [(logprob, token_id, text|None), ...], `finish_reason` =
  {"type": "stop"|"length"|"abort", "matched"|"length"|"message": ...} and `routed_experts` = base64 of the
  int32 array `[prompt_len + response_len - 1, num_hidden_layers, top_k]` (detokenizer_manager.py
  `_extract_routed_experts`, layers/moe/routed_experts_capturer.py); `weight_version` when set. Routes of
  dense layers are dropped so the result has one entry per MoE layer (ALGORITHM.md section 5).
- weight update, in this order: pause (`TokenizerManager.pause_generation(PauseGenerationReqInput(
  mode="retract"))`: running requests go back to the queue, so the later flush can succeed; a flush with
  requests running fails), `begin_weight_update()` if this SGLang has the session API (tokenizer_control_
  mixin.py, ~v0.5.12+; older builds load weights directly, so it is skipped), `update_weights_from_tensor(
  named_tensors, flush_cache=False)` in buckets with FP8 weights + `weight_scale_inv` quantised here
  (SGLang does not re-quantise bf16 into an FP8 checkpoint's blocks), `end_weight_update()`, `flush_cache()`,
  the new `weight_version`, then `continue_generation`. The offline Engine does not expose pause/continue/
  begin/end/update_weight_version in every version: they are called on `engine.tokenizer_manager` through
  `engine.loop` when the Engine lacks them.

Log-probs: SGLang reports log_softmax(logits / T) of each sampled token, the quantity the learner recomputes
(ALGORITHM.md). With the environment variable `SGLANG_RETURN_ORIGINAL_LOGPROB` set it reports the T = 1
values instead; the adapter warns once when that meets a temperature other than 0 or 1.

Threading: like the embedded engine, `generate` blocks; `update_weights` waits for a running `generate` to
finish (this adapter is never interruptible: SGLang does not report per-token versions). A failed update
may leave SGLang half-updated (SGLang says so); the adapter then refuses to generate until a complete update
succeeds. Malformed SGLang outputs raise `SGLangFormatError` naming the key and what was expected.

Legend: P prompt tokens, R response tokens, L layers, K top-k.
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minirl_async.engine.base import GenerateRequest, NamedTensors, Rollout, WeightUpdateError, aborted
from minirl_async.engine.weights import as_dict, check_update
from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import FP8_DTYPE, SCALE_SUFFIX, quantize_block_fp8, should_quantize
from minirl_async.models.routing import routes_dtype

if TYPE_CHECKING:
    from minirl_async.config import Config

log = logging.getLogger(__name__)
_MISSING = object()
UPDATE_BUCKET_BYTES = 512 << 20
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"
"""When truthy, SGLang returns log_softmax(logits) (temperature 1) instead of log_softmax(logits / T)."""


def original_logprob_env() -> bool:
    """Whether SGLang will return pre-temperature logprobs (it reads the variable as a bool: "1"/"true")."""
    return os.environ.get(ORIGINAL_LOGPROB_ENV, "").strip().lower() in ("1", "true", "yes", "on")


class SGLangFormatError(ValueError):
    """An SGLang output does not have the documented format."""


def parse_output(out: Any, prompt: list[int], cfg: ModelConfig, *, version: int, want_routes: bool) -> Rollout:
    """One SGLang output dict -> Rollout (see the module docstring for the format)."""
    if not isinstance(out, dict) or not isinstance(out.get("meta_info"), dict):
        raise SGLangFormatError("sglang output has no 'meta_info' dict")
    meta = out["meta_info"]
    if "output_token_logprobs" not in meta:
        raise SGLangFormatError("sglang meta_info lacks 'output_token_logprobs' (was return_logprob=True passed?)")
    try:
        pairs = [(float(e[0]), int(e[1])) for e in meta["output_token_logprobs"]]
    except (TypeError, ValueError, IndexError) as e:
        raise SGLangFormatError(f"sglang output_token_logprobs entries must be (logprob, token_id, text): {e}") from e
    ids = [t for _, t in pairs]
    if "output_ids" in out and list(out["output_ids"]) != ids:
        raise SGLangFormatError(f"sglang output_ids ({len(out['output_ids'])} tokens) disagree with the token ids "
                                f"of output_token_logprobs ({len(ids)} tokens)")
    fr = meta.get("finish_reason")
    if not isinstance(fr, dict) or fr.get("type") not in ("stop", "length", "abort"):
        raise SGLangFormatError(f"sglang finish_reason must be a dict with type stop/length/abort, got {fr!r}")
    P, R = len(prompt), len(ids)
    routes = None
    if want_routes and fr["type"] != "abort":
        routes = _decode_routes(meta.get("routed_experts"), P + R - 1, cfg)
    wv = meta.get("weight_version")
    tok_version = int(wv) if isinstance(wv, (int, str)) and str(wv).lstrip("-").isdigit() else version
    return Rollout(prompt_ids=prompt, response_ids=torch.tensor(ids, dtype=torch.int64),
                   logprobs=torch.tensor([lp for lp, _ in pairs], dtype=torch.float32),
                   versions=torch.full((R,), tok_version, dtype=torch.int64), routes=routes,
                   finish_reason=fr["type"], error=str(fr.get("message")) if fr["type"] == "abort" else None,
                   timings={"e2e_s": float(meta.get("e2e_latency", 0.0))})


def _decode_routes(b64: Any, rows: int, cfg: ModelConfig) -> torch.Tensor:
    if not isinstance(b64, str):
        raise SGLangFormatError("sglang meta_info lacks 'routed_experts' (launch with enable_return_routed_experts"
                                "=True and pass return_routed_experts=True)")
    try:
        flat = np.frombuffer(base64.b64decode(b64, validate=True), dtype=np.int32)
    except (binascii.Error, ValueError) as e:
        raise SGLangFormatError(f"sglang routed_experts is not base64 of int32 values: {e}") from e
    K, moe = cfg.num_experts_per_tok, cfg.moe_layer_ids
    for layers in (cfg.num_hidden_layers, len(moe)):
        if flat.size == rows * layers * K:
            arr = flat.reshape(rows, layers, K)
            if layers == cfg.num_hidden_layers and layers != len(moe):
                arr = arr[:, moe]   # SGLang captures every layer; dense layers carry no routing
            break
    else:
        raise SGLangFormatError(f"sglang routed_experts has {flat.size} values; expected {rows} positions "
                                f"(prompt + response - 1) x {cfg.num_hidden_layers} or {len(moe)} layers x {K}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.num_experts):
        raise SGLangFormatError(f"sglang routed_experts holds expert ids outside [0, {cfg.num_experts})")
    return torch.from_numpy(np.ascontiguousarray(arr)).to(routes_dtype(cfg.num_experts))


def fp8_wire_tensors(cfg: ModelConfig, named_tensors: NamedTensors, block: int,
                     fp8: bool) -> list[tuple[str, torch.Tensor]]:
    """Validate a complete HF state and put projections in block-FP8 (weight + weight_scale_inv) when `fp8`;
    already-FP8 tensors pass through. Raises WeightUpdateError (nothing is sent)."""
    tensors = as_dict(named_tensors)
    check_update(cfg, tensors, block)
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == FP8_DTYPE:
            out += [(name, t), (name + SCALE_SUFFIX, tensors[name + SCALE_SUFFIX])]
        elif fp8 and should_quantize(name):
            q, s = quantize_block_fp8(t, block)
            out += [(name, q), (name + SCALE_SUFFIX, s)]
        else:
            out.append((name, t))
    return out


class SGLangEngine:
    """The engine interface over an `sglang.Engine` (or anything with its methods, e.g. a test fake)."""

    def __init__(self, engine: Any, model_cfg: ModelConfig, *, version: int = 0, fp8: bool = True,
                 fp8_block: int = 128, capture_routes: bool = True, max_context: int | None = None):
        self.engine, self.cfg = engine, model_cfg
        self.fp8, self.fp8_block = fp8, fp8_block
        self.capture_routes = capture_routes and model_cfg.num_moe_layers > 0
        self.max_context = max_context or model_cfg.max_position_embeddings
        self._version = version
        self._lock = threading.Lock()      # held by generate; updates wait for it (version boundary)
        self._paused = False
        self._broken: str | None = None    # last failed update's message: SGLang may be half-updated
        self._warned_original_logprob = False
        self._stats = {"requests": 0, "refused_requests": 0, "updates": 0, "refused_updates": 0}

    @classmethod
    def from_config(cls, cfg: Config, model_cfg: ModelConfig, model_path: str, *, version: int = 0) -> SGLangEngine:
        try:
            import sglang  # optional extra: GPU samplers only
        except ImportError as e:
            raise ValueError("sampler.engine='sglang' needs the sglang package (pip install 'minirl-async[sglang]') "
                             "and a GPU; use sampler.engine='torch_fp8' otherwise") from e
        s = cfg.sampler
        kw: dict[str, Any] = {"model_path": model_path, "tp_size": s.sglang.tp_size,
                              "mem_fraction_static": s.sglang.mem_fraction_static,
                              "enable_return_routed_experts": s.capture_routes, "random_seed": cfg.run.seed}
        if s.fp8:
            kw["quantization"] = "fp8"
        kw.update(s.sglang.extra_args)
        return cls(sglang.Engine(**kw), model_cfg, version=version, fp8=s.fp8, fp8_block=cfg.model.fp8_block_size,
                   capture_routes=s.capture_routes, max_context=s.max_context or None)

    # ------------------------------------------------------------------------------------ helpers
    def _call(self, method: str, request_class: str | None = None, **kw: Any) -> Any:
        """Engine method if it exists, else the TokenizerManager coroutine of that name with its request
        object, run on the engine's loop; `_MISSING` when this SGLang has neither."""
        fn = getattr(self.engine, method, None)
        if fn is not None:
            return fn(**kw)
        tm = getattr(self.engine, "tokenizer_manager", None)
        tm_fn = getattr(tm, method, None)
        if tm_fn is None:
            return _MISSING
        args: tuple[Any, ...] = ()
        if request_class is not None:
            from sglang.srt.managers import io_struct  # type: ignore[import-not-found]

            args = (getattr(io_struct, request_class)(**kw),)
        try:
            coro = tm_fn(*args)
        except TypeError:  # sglang <= 0.5.5: pause_generation() / continue_generation() take no request
            coro = tm_fn()
        return self.engine.loop.run_until_complete(coro)

    @staticmethod
    def _ok(result: Any) -> tuple[bool, str]:
        """SGLang answers (success, message) tuples, objects with .success/.message, bools or None."""
        if result is None or result is _MISSING:
            return True, ""
        if isinstance(result, tuple) and len(result) >= 2:
            return bool(result[0]), str(result[1])
        if hasattr(result, "success"):
            return bool(result.success), str(getattr(result, "message", ""))
        return bool(result), ""

    # ------------------------------------------------------------------------------------ interface
    @property
    def version(self) -> int:
        return self._version

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Rollout]]:
        if self._broken is not None:
            raise RuntimeError(f"sglang engine refuses to generate after a failed weight update ({self._broken}); "
                               "send a complete update")
        out: list[list[Rollout]] = []
        slots: list[tuple[int, list[int]]] = []
        input_ids: list[list[int]] = []
        params: list[dict[str, Any]] = []
        for r, req in enumerate(requests):
            self._stats["requests"] += 1
            try:
                prompt = req.check(self.cfg.vocab_size, self.max_context)
            except ValueError as e:
                self._stats["refused_requests"] += 1
                n = req.params.n if isinstance(req.params.n, int) and req.params.n > 0 else 1
                try:
                    bad = req.prompt_list()
                except (TypeError, ValueError):
                    bad = []
                out.append([aborted(bad, f"request {req.request_id or r}: {e}") for _ in range(n)])
                continue
            p = req.params
            if p.temperature not in (0, 1) and not self._warned_original_logprob and original_logprob_env():
                # T = 0 is greedy: the learner then uses T = 1 too, so only other temperatures disagree.
                self._warned_original_logprob = True
                log.warning("%s is set, so SGLang returns temperature-1 logprobs, but requests sample at "
                            "temperature %g: the learner recomputes log_softmax(logits / %g) and the importance "
                            "ratios will be wrong; unset %s", ORIGINAL_LOGPROB_ENV, p.temperature,
                            p.temperature, ORIGINAL_LOGPROB_ENV)
            out.append([])
            for j in range(p.n):
                sp: dict[str, Any] = {"temperature": p.temperature, "top_p": p.top_p,
                                      "top_k": p.top_k if p.top_k > 0 else -1,
                                      "max_new_tokens": min(p.max_new_tokens, self.max_context - len(prompt)),
                                      "stop_token_ids": list(p.stop_token_ids), "n": 1}
                if p.seed is not None:
                    sp["sampling_seed"] = p.seed + j
                slots.append((r, prompt))
                input_ids.append(prompt)
                params.append(sp)
        if not input_ids:
            return out
        with self._lock:
            results = self.engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True,
                                           return_routed_experts=self.capture_routes)
            version = self._version
        if not isinstance(results, list) or len(results) != len(input_ids):
            raise SGLangFormatError(f"sglang returned {len(results) if isinstance(results, list) else results!r} "
                                    f"outputs for {len(input_ids)} inputs")
        for (r, prompt), res in zip(slots, results):
            out[r].append(parse_output(res, prompt, self.cfg, version=version, want_routes=self.capture_routes))
        return out

    def update_weights(self, version: int, named_tensors: NamedTensors) -> None:
        if version <= self._version:
            self._stats["refused_updates"] += 1
            raise WeightUpdateError(f"weight update refused: version {version} is not above the current "
                                    f"{self._version} (call reset() after a learner rollback)")
        try:
            wire = fp8_wire_tensors(self.cfg, named_tensors, self.fp8_block, self.fp8)
        except WeightUpdateError:
            self._stats["refused_updates"] += 1
            raise
        with self._lock:
            self._call("pause_generation", "PauseGenerationReqInput", mode="retract")
            try:
                failure = self._apply(version, wire)
            finally:
                self._call("continue_generation", "ContinueGenerationReqInput")
            if failure is not None:
                self._broken = failure
                self._stats["refused_updates"] += 1
                raise WeightUpdateError(f"sglang weight update to version {version} failed at {failure}; the "
                                        "engine may hold a partial update and will not generate until a complete "
                                        "update succeeds")
            self._broken = None
            self._version = version
            self._stats["updates"] += 1

    def _apply(self, version: int, wire: list[tuple[str, torch.Tensor]]) -> str | None:
        """begin -> tensor buckets -> end -> flush -> version; the first failing step as 'step: message'."""
        ok, msg = self._ok(self._call("begin_weight_update", "BeginWeightUpdateReqInput"))
        if not ok:
            return f"begin_weight_update: {msg}"
        failure = None
        for bucket in _buckets(wire, UPDATE_BUCKET_BYTES):
            ok, msg = self._ok(self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False))
            if not ok:
                failure = f"update_weights_from_tensor: {msg}"
                break
        ok, msg = self._ok(self._call("end_weight_update", "EndWeightUpdateReqInput"))  # close the session anyway
        if failure is not None or not ok:
            return failure or f"end_weight_update: {msg}"
        ok, msg = self._ok(self.engine.flush_cache())
        if not ok:
            return f"flush_cache: {msg}"
        ok, msg = self._ok(self._call("update_weight_version", "UpdateWeightVersionReqInput",
                                      new_version=str(version)))
        return None if ok else f"update_weight_version: {msg}"

    def pause(self) -> None:
        self._call("pause_generation", "PauseGenerationReqInput", mode="in_place")
        self._paused = True

    def resume(self) -> None:
        self._call("continue_generation", "ContinueGenerationReqInput")
        self._paused = False

    def reset(self) -> None:
        self._version = -1

    def health(self) -> dict[str, Any]:
        return {"engine": "sglang", "version": self._version, "paused": self._paused, "broken": self._broken,
                "capture_routes": self.capture_routes, "fp8": self.fp8, **self._stats}


def _buckets(items: list[tuple[str, torch.Tensor]], max_bytes: int) -> list[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of about `max_bytes`; a weight and its scale always travel together."""
    out: list[list[tuple[str, torch.Tensor]]] = [[]]
    size = 0
    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if out[-1] and size + nbytes > max_bytes and not name.endswith(SCALE_SUFFIX):
            out.append([])
            size = 0
        out[-1].append((name, t))
        size += nbytes
    return out
