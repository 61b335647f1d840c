"""Adapter from the engine interface (base.py) to `sglang.Engine` (GPU; optional extra, imported lazily).

    eng = SGLangEngine.from_config(cfg, model_cfg, "ckpt/", index=i)   # checks the folder, launches sglang.Engine
    rollouts = eng.generate(requests); eng.update_weights(v, named_tensors)

Needs sglang >= 0.5.10, < 0.6: `enable_return_routed_experts` / `return_routed_experts` exist from 0.5.7, and
the Engine can be built off the main thread (the sampler service builds it in a worker thread) from 0.5.10.
What SGLang is asked for (checked against the release source, python/sglang/srt/...):
- launch: `sglang.Engine(model_path, quantization="fp8", enable_return_routed_experts=True, tp_size,
  mem_fraction_static, random_seed, skip_tokenizer_init=True, enable_deterministic_inference,
  context_length, **sampler.sglang.extra_args)`. The folder is `sampler.sglang.model_path`, else the learner's
  checkpoint. With `sampler.fp8` it must be block-FP8 with block `model.fp8_block_size` (checked before the
  launch): SGLang treats a checkpoint as FP8-serialised only when config.json has quantization_config
  quant_method "fp8" + weight_block_size (layers/quantization/fp8.py); a BF16 folder is quantised online per
  tensor and the `weight_scale_inv` of our updates would be dropped. No tokenizer: the adapter speaks token ids.
- generate: `Engine.generate(input_ids=[...], sampling_params=[...], return_logprob=True,
  return_routed_experts=True)`; one SGLang request per sample (n=1, `sampling_seed` = seed + j, unseeded
  requests get a seed from this adapter's generator), so sample order and seeds are ours; `ignore_eos=True`
  (only `stop_token_ids` stop a sample, as in the embedded engine); `prompt + max_new_tokens` is kept below
  the context length (0.5.10 refuses equality, for the whole batch); top_p < 1 / top_k > 0 are refused per
  request (SGLang's log-probs are untruncated). An abort with an error status makes SGLang raise out of the
  whole batch (ValueError for 400, HTTPException otherwise; tokenizer_manager._handle_abort_finish_reason):
  the adapter then retries the batch's requests one by one and returns the failing ones as aborts. SGLang honours
  `sampling_seed` only when launched with enable_deterministic_inference (`sampler.sglang.deterministic`):
  without it, seeded requests do not reproduce. Each output dict has `output_ids` and `meta_info` with
  `output_token_logprobs` = [(logprob, token_id, text|None), ...], `finish_reason` =
  {"type": "stop"|"length"|"abort", "matched"|"length"|"message": ...}, `routed_experts` = base64 of the int32
  array `[prompt_len + response_len - 1, num_hidden_layers, top_k]` (state_capturer/routed_experts.py;
  layers/moe/routed_experts_capturer.py up to 0.5.10) and `weight_version`. Routes of dense layers are dropped
  so the result has one entry per MoE layer (ALGORITHM.md section 5).
- weight update, in this order: pause (`pause_generation(PauseGenerationReqInput(mode="retract"))`: running
  requests go back to the queue, so the later flush can succeed; a flush with requests running fails),
  `begin_weight_update()` (session API from 0.5.21, which then refuses updates outside a session; skipped on
  older builds), `update_weights_from_tensor(named_tensors, flush_cache=False)` in buckets with FP8 weights +
  `weight_scale_inv` quantised here (SGLang does not re-quantise bf16 into an FP8 checkpoint's blocks),
  `end_weight_update()` (always, in a finally), `flush_cache()`, `update_weight_version(...)` (from 0.5.19;
  skipped before, responses then carry our version), then `continue_generation`. A begin refused because a
  session is already open (e.g. left by a crash) ends that session and retries once. The 0.5.x Engine has no
  pause/continue/update_weight_version methods: those are `engine.tokenizer_manager` coroutines, run on
  `engine.loop` with their `managers/io_struct.py` request objects (submitted to the loop from this thread
  with `run_coroutine_threadsafe` when a `generate` in another thread is running it, e.g. `pause()`).
  A BF16 SGLang (`sampler.fp8 = false`) gets FP8 inputs dequantised to bf16: it would ignore the scales.

Log-probs: SGLang reports log_softmax(logits / T) of each sampled token, the quantity the learner recomputes
(ALGORITHM.md). With the environment variable `SGLANG_RETURN_ORIGINAL_LOGPROB` set to 1/true it reports the
T = 1 values instead; the adapter warns once when that meets a temperature other than 0 or 1.

Threading: like the embedded engine, `generate` blocks; `update_weights` waits for a running `generate` to
finish, so every response is produced by one weight version (SGLang also reports per-token `weight_versions`
spans from 0.5.19; with no update inside a generate they hold one span and are not read). A failed or
interrupted update may leave SGLang half-updated; the adapter then refuses to generate until a complete update
succeeds. Malformed SGLang outputs raise `SGLangFormatError` naming the key and what was expected.

Legend: P prompt tokens, R response tokens, L layers, K top-k.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import random
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from minirl_async.engine.base import (
    GenerateRequest,
    NamedTensors,
    Rollout,
    WeightUpdateError,
    aborted,
    check_version,
)
from minirl_async.engine.weights import as_dict, check_update
from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    block_size_from_config,
    dequantize_block_fp8,
    quantize_block_fp8,
    should_quantize,
)
from minirl_async.models.hf_io import read_hf_config
from minirl_async.models.routing import routes_dtype

if TYPE_CHECKING:
    from minirl_async.config import Config

log = logging.getLogger(__name__)
_MISSING = object()
UPDATE_BUCKET_BYTES = 512 << 20
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"
"""When truthy, SGLang returns log_softmax(logits) (temperature 1) instead of log_softmax(logits / T)."""
# Fields that fix tensor shapes and routing: SGLang's folder must match the learner's model in all of them.
# (max_position_embeddings: SGLang's default context length, which the adapter's length cap must agree with.)
_LAYOUT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                  "decoder_sparse_step", "mlp_only_layers", "tie_word_embeddings", "max_position_embeddings")


def original_logprob_env() -> bool:
    """Whether SGLang will return pre-temperature logprobs: its sampler reads the variable with
    get_bool_env_var, where only "1" and "true" (any case) are true."""
    return os.environ.get(ORIGINAL_LOGPROB_ENV, "").lower() in ("1", "true")


def check_model_folder(path: str, model_cfg: ModelConfig, fp8_block: int | None) -> None:
    """Refuse, before launching SGLang, a folder it would load differently from what weight updates assume:
    another architecture than `model_cfg`, or not block-FP8 with block `fp8_block` (None: must not be FP8)."""
    folder_cfg, raw = read_hf_config(path)
    diff = [f"{k} {getattr(folder_cfg, k)!r} != {getattr(model_cfg, k)!r}" for k in _LAYOUT_FIELDS
            if getattr(folder_cfg, k) != getattr(model_cfg, k)]
    if diff:
        raise ValueError(f"{path}: SGLang's model folder differs from the learner's model ({'; '.join(diff)}); "
                         "sampler.sglang.model_path must be a copy of the same architecture")
    found = block_size_from_config(raw, f"{path}/config.json")
    if found == fp8_block:
        return
    if fp8_block is None:
        raise ValueError(f"{path} is a block-FP8 checkpoint but sampler.fp8 = false: SGLang would load it as FP8 "
                         "while weight updates carry unquantised weights; set sampler.fp8 = true or use a BF16 folder")
    if found is None:
        raise ValueError(
            f"sampler.fp8 = true but {path} is not a block-FP8 checkpoint (config.json has no quantization_config "
            f"with quant_method 'fp8' and weight_block_size [{fp8_block}, {fp8_block}]): SGLang would quantise it "
            "per tensor and ignore the weight_scale_inv of weight updates. Point sampler.sglang.model_path at an "
            f"FP8 copy (Qwen's -FP8 releases use block 128, or write one with minirl_async.models.hf_io.save_hf("
            f"model, cfg, folder, fp8_block_size={fp8_block})), or set sampler.fp8 = false")
    raise ValueError(f"{path} is block-FP8 with weight_block_size [{found}, {found}] but model.fp8_block_size = "
                     f"{fp8_block}: weight updates would carry scales SGLang cannot load; set "
                     f"model.fp8_block_size = {found} or use a folder quantised with block {fp8_block}")


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
    already-FP8 tensors pass through. Without `fp8` (a BF16 SGLang) FP8 inputs are dequantised to bf16:
    SGLang's BF16 model skips `*_scale_inv` names and would load the raw FP8 values unscaled.
    Raises WeightUpdateError (nothing is sent)."""
    tensors = as_dict(named_tensors)
    check_update(cfg, tensors, block)
    out: list[tuple[str, torch.Tensor]] = []
    for name, t in tensors.items():
        if name.endswith(SCALE_SUFFIX):
            continue
        if t.dtype == FP8_DTYPE and not fp8:
            out.append((name, dequantize_block_fp8(t, tensors[name + SCALE_SUFFIX], block, torch.bfloat16)))
        elif t.dtype == FP8_DTYPE:
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
                 fp8_block: int = 128, capture_routes: bool = True, max_context: int | None = None,
                 seed: int = 0):
        self.engine, self.cfg = engine, model_cfg
        self.fp8, self.fp8_block = fp8, fp8_block
        self.capture_routes = capture_routes and model_cfg.num_moe_layers > 0
        self.max_context = max_context or model_cfg.max_position_embeddings
        self._version = version
        self._lock = threading.Lock()      # held by generate; updates wait for it (version boundary)
        self._paused = False
        self._broken: str | None = None    # last failed update's message: SGLang may be half-updated
        self._warned_original_logprob = False
        # Seeds of unseeded requests: under deterministic inference SGLang gives every unseeded request the
        # same fixed seed, so the samples of a group would be identical.
        self._seed_rng = random.Random(seed)
        self._stats = {"requests": 0, "refused_requests": 0, "updates": 0, "refused_updates": 0}

    @classmethod
    def from_config(cls, cfg: Config, model_cfg: ModelConfig, model_path: str, *, version: int = 0,
                    index: int = 0) -> SGLangEngine:
        """Check SGLang's folder (`sampler.sglang.model_path`, else `model_path`) and launch the engine of
        sampler `index` (its seed: run.seed * 1000 + index, as the fake engine's)."""
        s = cfg.sampler
        path = s.sglang.model_path or model_path
        check_model_folder(path, model_cfg, cfg.model.fp8_block_size if s.fp8 else None)
        try:
            import sglang  # optional extra: GPU samplers only
        except ImportError as e:
            raise ValueError("sampler.engine='sglang' needs the sglang package (pip install 'minirl-async[sglang]') "
                             "and a GPU; use sampler.engine='torch_fp8' otherwise") from e
        seed = cfg.run.seed * 1000 + index
        kw: dict[str, Any] = {"model_path": path, "tp_size": s.sglang.tp_size,
                              "mem_fraction_static": s.sglang.mem_fraction_static,
                              "enable_return_routed_experts": s.capture_routes, "random_seed": seed,
                              "skip_tokenizer_init": True,   # token ids in and out; folders may lack a tokenizer
                              "enable_deterministic_inference": s.sglang.deterministic}
        if s.max_context:
            kw["context_length"] = s.max_context
        if s.fp8:
            kw["quantization"] = "fp8"
        kw.update(s.sglang.extra_args)
        return cls(sglang.Engine(**kw), model_cfg, version=version, fp8=s.fp8, fp8_block=cfg.model.fp8_block_size,
                   capture_routes=s.capture_routes, max_context=s.max_context or None, seed=seed)

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
        loop = self.engine.loop
        if loop.is_running():   # a generate in another thread is running the engine's loop (pause / resume)
            return asyncio.run_coroutine_threadsafe(tm_fn(*args), loop).result()
        return loop.run_until_complete(tm_fn(*args))

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
        # SGLang 0.5.10 refuses prompt + max_new_tokens >= its context length (later releases only >), and the
        # whole batch with it: keep one position free.
        context = self.max_context - 1
        for r, req in enumerate(requests):
            self._stats["requests"] += 1
            try:
                prompt = req.check(self.cfg.vocab_size, context)
                if req.params.top_p < 1 or 0 < req.params.top_k < self.cfg.vocab_size:
                    raise ValueError("the sglang engine reports untruncated log-probs, so top_p < 1 or top_k > 0 "
                                     "would make the learner's importance ratios wrong; sample with top_p = 1 "
                                     "and top_k = 0 (or use the torch_fp8 engine)")
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
            base = p.seed if p.seed is not None else self._seed_rng.getrandbits(62)
            for j in range(p.n):
                # ignore_eos: stop only on stop_token_ids, as the interface says (SGLang would also stop on
                # the model's EOS ids from config.json / generation_config.json).
                sp: dict[str, Any] = {"temperature": p.temperature, "top_p": 1.0, "top_k": -1,
                                      "max_new_tokens": min(p.max_new_tokens, context - len(prompt)),
                                      "stop_token_ids": list(p.stop_token_ids), "ignore_eos": True, "n": 1}
                sp["sampling_seed"] = base + j   # honoured only with enable_deterministic_inference
                slots.append((r, prompt))
                input_ids.append(prompt)
                params.append(sp)
        if not input_ids:
            return out
        with self._lock:
            version = self._version
            try:
                results: list[Any] = self._generate(input_ids, params)
            except Exception as e:  # noqa: BLE001 - SGLang raises for the whole batch when one request fails
                results = self._one_by_one(input_ids, params, e)
        for (r, prompt), res in zip(slots, results):
            if isinstance(res, BaseException):
                self._stats["refused_requests"] += 1
                out[r].append(aborted(prompt, f"sglang refused the request: {type(res).__name__}: {res}"))
            else:
                out[r].append(parse_output(res, prompt, self.cfg, version=version, want_routes=self.capture_routes))
        return out

    def _generate(self, input_ids: list[list[int]], params: list[dict[str, Any]]) -> list[Any]:
        results = self.engine.generate(input_ids=input_ids, sampling_params=params, return_logprob=True,
                                       return_routed_experts=self.capture_routes)
        if not isinstance(results, list) or len(results) != len(input_ids):
            raise SGLangFormatError(f"sglang returned {len(results) if isinstance(results, list) else results!r} "
                                    f"outputs for {len(input_ids)} inputs")
        return results

    def _one_by_one(self, input_ids: list[list[int]], params: list[dict[str, Any]],
                    error: Exception) -> list[Any]:
        """After a batch failed: each request alone, so one refused request (SGLang raises ValueError for an
        abort with status 400, HTTPException for other error statuses, out of the whole batch) does not cost
        the others their samples. The failures come back as exceptions; if no request succeeds and not all
        failures are request errors (ValueError), the engine itself is failing and the batch's error is raised."""
        log.warning("sglang batch of %d failed (%s: %s); retrying its requests one by one", len(input_ids),
                    type(error).__name__, error)
        results: list[Any] = []
        for ids, sp in zip(input_ids, params):
            try:
                results.append(self._generate([ids], [sp])[0])
            except Exception as e:  # noqa: BLE001
                results.append(e)
        failures = [r for r in results if isinstance(r, Exception)]
        if len(failures) == len(results) and not all(isinstance(f, ValueError) and not isinstance(f, SGLangFormatError)
                                                     for f in failures):
            raise error
        return results

    def update_weights(self, version: int, named_tensors: NamedTensors) -> None:
        try:
            check_version(version, self._version)
            wire = fp8_wire_tensors(self.cfg, named_tensors, self.fp8_block, self.fp8)
        except WeightUpdateError:
            self._stats["refused_updates"] += 1
            raise
        with self._lock:
            try:
                check_version(version, self._version)   # a concurrent update may have got there first
            except WeightUpdateError:
                self._stats["refused_updates"] += 1
                raise
            self._call("pause_generation", "PauseGenerationReqInput", mode="retract")
            # Broken until the update completes: an exception half-way leaves SGLang partly updated.
            self._broken = f"the update to version {version} did not complete"
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

    def _begin(self) -> tuple[bool, str]:
        ok, msg = self._ok(self._call("begin_weight_update", "BeginWeightUpdateReqInput"))
        if not ok and "already open" in msg:
            # A session left open (an earlier process or client died inside one) would block every update.
            log.warning("sglang reports an open weight-update session (%s); ending it and retrying", msg)
            self._call("end_weight_update", "EndWeightUpdateReqInput")
            ok, msg = self._ok(self._call("begin_weight_update", "BeginWeightUpdateReqInput"))
        return ok, msg

    def _apply(self, version: int, wire: list[tuple[str, torch.Tensor]]) -> str | None:
        """begin -> tensor buckets -> end -> flush -> version; the first failing step as 'step: message'."""
        ok, msg = self._begin()
        if not ok:
            return f"begin_weight_update: {msg}"
        failure = None
        try:
            for bucket in _buckets(wire, UPDATE_BUCKET_BYTES):
                ok, msg = self._ok(self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=False))
                if not ok:
                    failure = f"update_weights_from_tensor: {msg}"
                    break
        finally:  # close the session even when a bucket raised: an open session refuses the next begin
            ok, msg = self._ok(self._call("end_weight_update", "EndWeightUpdateReqInput"))
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
