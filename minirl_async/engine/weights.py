"""Validation and preparation of a weight update for the embedded engine (HF names in, model params out).

A weight update is a complete set of HF-named tensors (`models.hf_io.expected_hf_shapes`), each projection
either as FP8 (`X.weight` float8_e4m3fn + `X.weight_scale_inv` float32 `[ceil(N/b), ceil(M/b)]`, as the
learner publishes for FP8 samplers) or as a plain floating tensor (then quantised here when the engine is
FP8). `prepare_update` checks the whole set before anything is touched: missing, extra, misshaped,
wrongly typed or non-finite tensors (FP8 NaN bytes included, and weights that overflow once dequantised
into the compute dtype) raise `WeightUpdateError` listing the offenders, and the engine keeps its previous
weights. The result is a dict of the model's parameter tensors (experts stacked), in the
compute dtype, ready to be swapped in. It never shares memory with the caller's tensors (a cast to the same
dtype and device, or `.contiguous()` of a contiguous tensor, returns its input: such results are cloned), so
changing the caller's model after an update does not change what the engine serves.

Why dequantise once per update (a cached copy in the compute dtype) rather than per matmul: on CPU there
is no FP8 GEMM, so per-matmul dequantisation costs a full pass over every weight per decode step, which
dominates a small model's step (the sampler bench reports `dequant_per_step_ms` next to the step time).
The numbers are the same either way: `dequantize_block_fp8(w, s, b, dtype)` is the value a block-scaled
FP8 GEMM multiplies by, rounded once to the compute dtype.

Legend: E experts, F expert FFN width, D hidden.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from minirl_async.engine.base import NamedTensors, WeightUpdateError
from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    dequantize_block_fp8,
    quantize_block_fp8,
    should_quantize,
)
from minirl_async.models.hf_io import expected_hf_shapes

_SCALE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)   # (no isfinite for float8)
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def as_dict(named_tensors: NamedTensors) -> dict[str, torch.Tensor]:
    if isinstance(named_tensors, Mapping):
        return dict(named_tensors)
    out: dict[str, torch.Tensor] = {}
    for name, t in named_tensors:
        if name in out:
            raise WeightUpdateError(f"weight update: tensor {name} appears twice")
        out[name] = t
    return out


def _list(names: Iterable[str], limit: int = 5) -> str:
    items = sorted(names)
    more = f" (+{len(items) - limit} more)" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def check_update(cfg: ModelConfig, tensors: Mapping[str, torch.Tensor], block: int) -> None:
    """Raise WeightUpdateError unless `tensors` is exactly one complete, well-formed HF state of `cfg`."""
    want = expected_hf_shapes(cfg)
    problems: list[str] = []
    missing = [n for n in want if n not in tensors]
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): {_list(missing)}")
    extra = [n for n in tensors if n not in want
             and not (n.endswith(SCALE_SUFFIX) and n[: -len(SCALE_SUFFIX)] in want)]
    if extra:
        problems.append(f"unexpected {len(extra)} tensor(s): {_list(extra)}")
    for name, shape in want.items():
        t = tensors.get(name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            problems.append(f"{name} is a {type(t).__name__}, not a tensor")
            continue
        if tuple(t.shape) != shape:
            problems.append(f"{name} has shape {tuple(t.shape)}, expected {shape}")
            continue
        scale = tensors.get(name + SCALE_SUFFIX)
        if t.dtype == FP8_DTYPE:
            if not should_quantize(name):
                problems.append(f"{name} is float8 but this tensor is never FP8 (only projections are)")
            elif scale is None:
                problems.append(f"{name} is float8 but {name + SCALE_SUFFIX} is missing")
            elif not isinstance(scale, torch.Tensor):
                problems.append(f"{name + SCALE_SUFFIX} is a {type(scale).__name__}, not a tensor")
            else:
                n, m = -(-shape[0] // block), -(-shape[1] // block)
                if tuple(scale.shape) != (n, m) or scale.dtype not in _SCALE_DTYPES:
                    problems.append(f"{name + SCALE_SUFFIX} has shape {tuple(scale.shape)} {scale.dtype}, expected "
                                    f"({n}, {m}) float32 for block {block}")
                elif not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
                    problems.append(f"{name + SCALE_SUFFIX} holds non-finite or non-positive scales")
                elif _fp8_has_nan(t):
                    problems.append(f"non-finite FP8 weight bytes (NaN) in {name}")
        else:
            if scale is not None:
                problems.append(f"{name + SCALE_SUFFIX} given but {name} is {t.dtype}, not float8")
            if not t.is_floating_point():
                problems.append(f"{name} has dtype {t.dtype}; expected a floating dtype or float8 + scale")
            elif not bool(torch.isfinite(t).all()):
                problems.append(f"{name} holds non-finite values")
    if problems:
        raise WeightUpdateError("weight update refused, old weights kept: " + "; ".join(problems[:8])
                                + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else ""))


def _shares_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` lives in `b`'s memory (same storage: `b` itself or any view of it)."""
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def _fp8_has_nan(w_fp8: torch.Tensor) -> bool:
    """float8_e4m3fn has no inf; NaN is every byte with all exponent and mantissa bits set (0x7F, 0xFF)."""
    return bool(((w_fp8.view(torch.uint8) & 0x7F) == 0x7F).any())


def prepare_update(cfg: ModelConfig, named_tensors: NamedTensors, *, fp8: bool, block: int,
                   dtype: torch.dtype, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Validate, then build the model's parameters (in-memory names, experts stacked) in `dtype`.
    FP8 engine: projections go through block-FP8 (quantised here if they arrive unquantised). Non-FP8
    engine: FP8 inputs are dequantised, plain tensors are cast. Every result is checked finite (a finite
    FP8 byte times a huge scale, or a float64 value cast to bf16, can overflow), so a refused update
    raises before the engine touches its weights."""
    tensors = as_dict(named_tensors)
    check_update(cfg, tensors, block)
    out: dict[str, torch.Tensor] = {}
    overflow: list[str] = []
    experts: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name in expected_hf_shapes(cfg):
        t = tensors[name]
        if t.dtype == FP8_DTYPE:
            w = dequantize_block_fp8(t.to(device), tensors[name + SCALE_SUFFIX].to(device), block, dtype)
        elif fp8 and should_quantize(name):
            q, s = quantize_block_fp8(t.to(device), block)
            w = dequantize_block_fp8(q, s, block, dtype)
        else:
            w = t.to(device=device, dtype=dtype)
        if not bool(torch.isfinite(w).all()):
            overflow.append(name)
            continue
        m = _EXPERT_RE.match(name)
        if m:   # stacked below (a copy)
            experts.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = w
        else:
            w = w.contiguous()
            if _shares_storage(w, t):   # a no-op cast / contiguous returned the caller's tensor (or a view)
                w = w.clone()
            out[name] = w
    if overflow:
        raise WeightUpdateError(f"weight update refused, old weights kept: non-finite values after dequantising "
                                f"to {dtype} in {len(overflow)} tensor(s): {_list(overflow)}")
    for base, per_expert in experts.items():
        E = len(per_expert)
        out[base + ".gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[j]["gate"], per_expert[j]["up"]], dim=0) for j in range(E)])   # [E, 2F, D]
        out[base + ".down_proj"] = torch.stack([per_expert[j]["down"] for j in range(E)])          # [E, D, F]
    return out
