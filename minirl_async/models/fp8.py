"""Block-FP8 weights: `float8_e4m3fn` values + one float32 `weight_scale_inv` per `block x block` tile.

This is the layout of FP8-serialised checkpoints (DeepSeek-V3, Qwen3-*-FP8) that SGLang loads with
`quantization="fp8"`: HF name `X.weight` (fp8, same shape as the bf16 weight) + `X.weight_scale_inv`
(float32, `[ceil(N/b), ceil(M/b)]`), and dequantisation is `w = w_fp8 * scale_inv` tile by tile. Shapes not
divisible by the block are handled as if zero-padded to the next multiple (padding never changes a tile's
absolute max), then cropped.

Error bound (per element, tested): with `s = amax(tile) / 448` the scaled value `w/s` lies in [-448, 448];
e4m3 keeps 3 mantissa bits, so round-to-nearest errs by at most 2^-4 of the value in the normal range
(|w/s| >= 2^-6) and by at most half the subnormal spacing, 2^-10, below it. Hence
    |dequant(quant(w)) - w| <= max(2^-4 * |w|, 2^-10 * s)        (plus float32 rounding, ~2^-23 |w|).

Which weights are quantised (as in the official Qwen3-MoE FP8 checkpoints and SGLang's loader): every
projection of attention (`q/k/v/o_proj`), of dense MLPs and of every expert (`gate/up/down_proj`). Not:
embeddings, `lm_head`, norms, and the router `mlp.gate` (SGLang builds it with `quant_config=None`).
`config.json` then carries `quantization_config = fp8_quantization_config(block)`.

Legend: N rows (output features), M columns (input features), n = ceil(N/b), m = ceil(M/b).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
SCALE_SUFFIX = "_scale_inv"
# Projections of attention, dense MLPs and experts; `mlp.gate.weight` (router) deliberately does not match.
_QUANTIZED_RE = re.compile(
    r"^model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(experts\.\d+\.)?(gate|up|down)_proj)\.weight$")


def _check_block(block: int) -> None:
    if block < 1:
        raise ValueError(f"FP8 block size must be >= 1, got {block}")


def quantize_block_fp8(w_NM: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise the last two dims of `w` in `block x block` tiles. Returns `(w_fp8 [..., N, M],
    scale_inv [..., n, m] float32)`; leading dims (e.g. stacked experts) are kept."""
    _check_block(block)
    if w_NM.dim() < 2:
        raise ValueError(f"block-FP8 quantises matrices; got shape {tuple(w_NM.shape)}")
    *lead, N, M = w_NM.shape
    n, m = -(-N // block), -(-M // block)
    w = w_NM.detach().to(torch.float32)
    pad = torch.nn.functional.pad(w, (0, m * block - M, 0, n * block - N))
    tiles = pad.reshape(*lead, n, block, m, block)
    amax_nm = tiles.abs().amax(dim=(-3, -1))
    # An all-zero tile gets a tiny positive scale, so the division stays finite and zeros stay zeros.
    scale_nm = amax_nm.clamp(min=1e-12) / FP8_MAX
    q = (tiles / scale_nm[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q_NM = q.reshape(*lead, n * block, m * block)[..., :N, :M].contiguous()
    return q_NM, scale_nm.contiguous()


def dequantize_block_fp8(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block: int,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_block_fp8`: `w = w_fp8 * scale_inv` tile by tile, computed in float32."""
    _check_block(block)
    *lead, N, M = w_fp8.shape
    n, m = -(-N // block), -(-M // block)
    if tuple(scale_inv.shape) != (*lead, n, m):
        raise ValueError(f"weight_scale_inv has shape {tuple(scale_inv.shape)}, expected {(*lead, n, m)} "
                         f"for a weight of shape {(*lead, N, M)} and block {block}")
    s = scale_inv.to(torch.float32).repeat_interleave(block, dim=-2).repeat_interleave(block, dim=-1)
    return (w_fp8.to(torch.float32) * s[..., :N, :M]).to(dtype)


def should_quantize(hf_name: str) -> bool:
    """True for the HF weights an FP8 checkpoint stores in FP8 (see module docstring)."""
    return _QUANTIZED_RE.match(hf_name) is not None


def fp8_quantization_config(block: int) -> dict[str, Any]:
    """The `quantization_config` of config.json, as in the official Qwen3-MoE FP8 checkpoints."""
    _check_block(block)
    return {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
            "weight_block_size": [block, block]}


def block_size_from_config(hf_config: dict[str, Any], source: str = "config.json") -> int | None:
    """Block edge of an FP8 folder's config.json, or None when the folder is not FP8."""
    q = hf_config.get("quantization_config")
    if not q:
        return None
    if q.get("quant_method") != "fp8":
        raise ValueError(f"{source}: quantization_config.quant_method={q.get('quant_method')!r} is not "
                         "supported (only 'fp8')")
    bs = q.get("weight_block_size")
    if not (isinstance(bs, list) and len(bs) == 2 and bs[0] == bs[1] and int(bs[0]) >= 1):
        raise ValueError(f"{source}: quantization_config.weight_block_size={bs!r}; need a square block "
                         "[b, b] (per-tensor FP8 is not supported)")
    return int(bs[0])


def quantize_state(items: Iterable[tuple[str, torch.Tensor]], block: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream HF `(name, tensor)` pairs into their FP8-checkpoint form: each quantised weight becomes
    `(name, fp8)` then `(name + "_scale_inv", float32)`; everything else passes through unchanged."""
    _check_block(block)
    for name, t in items:
        if should_quantize(name):
            q, s = quantize_block_fp8(t, block)
            yield name, q
            yield name + SCALE_SUFFIX, s
        else:
            yield name, t


def dequantize_state(names: Iterable[str], get: Callable[[str], torch.Tensor], block: int,
                     dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream the dequantised HF state of an FP8 checkpoint. `names` are the stored keys, `get(name)`
    reads one tensor (e.g. from `safe_open`); scale tensors are consumed with their weight."""
    name_set = set(names)
    for name in sorted(name_set):
        if name.endswith(SCALE_SUFFIX):
            if name[: -len(SCALE_SUFFIX)] not in name_set:
                raise ValueError(f"{name}: scale without its weight {name[: -len(SCALE_SUFFIX)]}")
            continue
        t = get(name)
        if t.dtype == FP8_DTYPE:
            if name + SCALE_SUFFIX not in name_set:
                raise ValueError(f"{name} is float8 but {name + SCALE_SUFFIX} is missing")
            yield name, dequantize_block_fp8(t, get(name + SCALE_SUFFIX), block, dtype)
        else:
            yield name, t.to(dtype) if t.is_floating_point() else t
