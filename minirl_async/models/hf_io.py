"""Hugging Face folder I/O for Qwen3-MoE: `config.json` + `model.safetensors` (or sharded
`model-0000i-of-0000n.safetensors` + `model.safetensors.index.json`), streamed tensor by tensor.

On disk experts use HF's per-expert keys `model.layers.{i}.mlp.experts.{j}.{gate,up,down}_proj.weight`
(`[F, D]`, `[F, D]`, `[D, F]`); in memory they are stacked (`experts.gate_up_proj [E, 2F, D]`,
`experts.down_proj [E, D, F]`, see qwen3_moe.py). `iter_hf_state(model)` yields the on-disk naming one
tensor at a time; weight publication and export use it. A tied `lm_head.weight` is not written (as HF does).

    save_hf(model, cfg, "out/")                          # bf16/fp32 folder transformers and SGLang load
    save_hf(model, cfg, "out_fp8/", fp8_block_size=128)  # block-FP8 folder (weight + weight_scale_inv)
    model, cfg = load_hf("out_fp8/", dtype=torch.float32) # dequantised on load
    for name, t in iter_hf_folder("out_fp8/", keep_fp8=True): ...   # raw FP8 tensors for an FP8 engine

Reading is lazy (`safe_open`); writing holds at most one shard of copies. A malformed folder (no
config.json, other architecture, missing/unexpected key, shape mismatch) raises ValueError naming the key
and the file.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import (
    FP8_DTYPE,
    SCALE_SUFFIX,
    block_size_from_config,
    dequantize_block_fp8,
    fp8_quantization_config,
    quantize_state,
    should_quantize,
)
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

CONFIG_NAME = "config.json"
SINGLE_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
_EXPERT_RE = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


# ---- naming ---------------------------------------------------------------------------------------------
def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every key an HF folder of this config holds (unquantised), with its shape, in model order."""
    D, V, hd = cfg.hidden_size, cfg.vocab_size, cfg.head_dim
    H, Hkv, Fe, Fd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.moe_intermediate_size, cfg.intermediate_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (V, D)}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (D,)
        out[p + "self_attn.q_proj.weight"] = (H * hd, D)
        out[p + "self_attn.k_proj.weight"] = (Hkv * hd, D)
        out[p + "self_attn.v_proj.weight"] = (Hkv * hd, D)
        out[p + "self_attn.o_proj.weight"] = (D, H * hd)
        out[p + "self_attn.q_norm.weight"] = (hd,)
        out[p + "self_attn.k_norm.weight"] = (hd,)
        out[p + "post_attention_layernorm.weight"] = (D,)
        if cfg.is_moe_layer(i):
            out[p + "mlp.gate.weight"] = (cfg.num_experts, D)
            for j in range(cfg.num_experts):
                out[p + f"mlp.experts.{j}.gate_proj.weight"] = (Fe, D)
                out[p + f"mlp.experts.{j}.up_proj.weight"] = (Fe, D)
                out[p + f"mlp.experts.{j}.down_proj.weight"] = (D, Fe)
        else:
            out[p + "mlp.gate_proj.weight"] = (Fd, D)
            out[p + "mlp.up_proj.weight"] = (Fd, D)
            out[p + "mlp.down_proj.weight"] = (D, Fd)
    out["model.norm.weight"] = (D,)
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (V, D)
    return out


def _local(t: torch.Tensor) -> torch.Tensor:
    # FSDP2 parameters are DTensors: gather the full tensor (a collective: every rank must iterate).
    full = getattr(t, "full_tensor", None)
    return (full() if full is not None else t).detach()


def iter_hf_state(model: Qwen3MoeForCausalLM) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, tensor)` in HF on-disk naming, one at a time (expert slices are views)."""
    cfg = model.config
    Fe = cfg.moe_intermediate_size
    for name, p in model.named_parameters(remove_duplicate=True):
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("mlp.experts.gate_up_proj"):
            base, w = name[: -len("gate_up_proj")], _local(p)
            for j in range(w.shape[0]):
                yield f"{base}{j}.gate_proj.weight", w[j, :Fe]
                yield f"{base}{j}.up_proj.weight", w[j, Fe:]
        elif name.endswith("mlp.experts.down_proj"):
            base, w = name[: -len("down_proj")], _local(p)
            for j in range(w.shape[0]):
                yield f"{base}{j}.down_proj.weight", w[j]
        else:
            yield name, _local(p)


# ---- writing --------------------------------------------------------------------------------------------
def save_hf(model: Qwen3MoeForCausalLM, cfg: ModelConfig, folder: str | os.PathLike[str], *,
            dtype: torch.dtype | None = None, fp8_block_size: int | None = None,
            max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write an HF folder. `dtype` casts floating tensors (default: as stored); `fp8_block_size` writes a
    block-FP8 checkpoint (projections as fp8 + `weight_scale_inv`, config `quantization_config`).
    Tensors are written shard by shard (`max_shard_bytes` each); one shard is `model.safetensors`."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    items: Iterator[tuple[str, torch.Tensor]] = (
        (n, t.to(dtype) if dtype is not None and t.is_floating_point() else t) for n, t in iter_hf_state(model))
    if fp8_block_size is not None:
        items = quantize_state(items, fp8_block_size)
    for old in list(out.glob("model*.safetensors")) + [out / INDEX_NAME]:
        old.unlink(missing_ok=True)  # stale shards of an earlier save would be picked up by readers
    tmp_names: list[Path] = []
    weight_map: dict[str, int] = {}
    shard: dict[str, torch.Tensor] = {}
    shard_bytes = total = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        path = out / f".shard-{len(tmp_names):05d}.tmp"
        save_file(shard, str(path), metadata={"format": "pt"})
        tmp_names.append(path)
        shard, shard_bytes = {}, 0

    for name, t in items:
        nbytes = t.numel() * t.element_size()
        if shard and shard_bytes + nbytes > max_shard_bytes:
            flush()
        shard[name] = t.contiguous().cpu()
        weight_map[name] = len(tmp_names)
        shard_bytes += nbytes
        total += nbytes
    if shard or not tmp_names:
        flush()
    n = len(tmp_names)
    finals = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, final in zip(tmp_names, finals):
        tmp.replace(out / final)
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": {k: finals[v] for k, v in weight_map.items()}}
        (out / INDEX_NAME).write_text(json.dumps(index, indent=2))
    hf = cfg.to_hf_dict()
    first = next(iter(model.parameters()))
    hf["torch_dtype"] = hf["dtype"] = str(dtype or first.dtype).removeprefix("torch.")  # old and new key
    if fp8_block_size is not None:
        hf["quantization_config"] = fp8_quantization_config(fp8_block_size)
    (out / CONFIG_NAME).write_text(json.dumps(hf, indent=2))
    return out


# ---- reading --------------------------------------------------------------------------------------------
def read_hf_config(folder: str | os.PathLike[str]) -> tuple[ModelConfig, dict[str, Any]]:
    """Parse `folder/config.json`; returns the ModelConfig and the raw dict."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise ValueError(f"{path}: missing config.json; point model.path at an HF model folder")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    return ModelConfig.from_hf_dict(raw, source=str(path)), raw


def _weight_files(folder: Path) -> dict[str, Path]:
    """Map every stored key to its safetensors file (index when present, else every model*.safetensors)."""
    index = folder / INDEX_NAME
    if index.is_file():
        wm = json.loads(index.read_text()).get("weight_map")
        if not isinstance(wm, dict):
            raise ValueError(f"{index}: no 'weight_map' object")
        out = {k: folder / v for k, v in wm.items()}
        for k, p in out.items():
            if not p.is_file():
                raise ValueError(f"{index}: key {k} points to missing file {p.name}")
        return out
    files = sorted(folder.glob("model*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no model*.safetensors file")
    out = {}
    for p in files:
        with _safe_open(p) as f:
            for k in f.keys():
                if k in out:
                    raise ValueError(f"{p.name}: key {k} also stored in {out[k].name}")
                out[k] = p
    return out


def _safe_open(path: Path) -> Any:
    """`safe_open`, with the file named when it is not a readable safetensors file (truncated, corrupt)."""
    try:
        return safe_open(str(path), framework="pt")
    except Exception as e:   # SafetensorError is not importable by name from every safetensors version
        raise ValueError(f"{path}: not a readable safetensors file ({type(e).__name__}: {e})") from None


class _Reader:
    """Lazy access to the tensors of a folder, keeping one `safe_open` handle per file."""

    def __init__(self, folder: Path, stack: contextlib.ExitStack) -> None:
        self.files = _weight_files(folder)
        self._stack, self._open = stack, {}  # type: ignore[var-annotated]

    def _handle(self, name: str) -> Any:
        p = self.files[name]
        if p not in self._open:
            self._open[p] = self._stack.enter_context(_safe_open(p))
        h = self._open[p]
        if name not in h.keys():  # the index points at a file that lacks the key
            raise ValueError(f"{p.name}: key {name} is listed in {INDEX_NAME} but not stored in the file")
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)


def _check_folder(reader: _Reader, cfg: ModelConfig, block: int | None) -> None:
    """Compare stored keys and shapes with what the config needs, before reading any tensor data."""
    want = expected_hf_shapes(cfg)
    stored = dict(reader.files)
    if cfg.tie_word_embeddings:
        stored.pop("lm_head.weight", None)  # some exporters write the tied head anyway; HF ignores it
    for name, path in stored.items():
        if name.endswith(SCALE_SUFFIX):
            base = name[: -len(SCALE_SUFFIX)]
            if block is None or base not in want or len(want[base]) != 2:
                raise ValueError(f"{path.name}: unexpected key {name}"
                                 + ("" if block else " (config.json has no FP8 quantization_config)")
                                 + (" (only 2-D weights have FP8 scales)" if base in want and len(want[base]) != 2 else ""))
            N, M = want[base][-2:]
            need = (-(-N // block), -(-M // block))
            if reader.shape(name) != need:
                raise ValueError(f"{path.name}: {name} has shape {reader.shape(name)}, expected {need} "
                                 f"(block {block})")
            continue
        if name not in want:
            raise ValueError(f"{path.name}: unexpected key {name} (not part of a {cfg.num_hidden_layers}-layer "
                             "Qwen3-MoE with this config.json)")
        if reader.shape(name) != want[name]:
            raise ValueError(f"{path.name}: {name} has shape {reader.shape(name)}, expected {want[name]} "
                             "from config.json")
    missing = [k for k in want if k not in stored]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ValueError(f"{reader.files and next(iter(reader.files.values())).parent}: missing key(s) "
                         f"{missing[:3]}{more}")


def iter_hf_folder(folder: str | os.PathLike[str], *, dtype: torch.dtype | None = None,
                   keep_fp8: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
    """Validate a folder, then yield its `(hf_name, tensor)` pairs lazily. FP8 weights are dequantised
    (to `dtype`, default float32) unless `keep_fp8`, in which case `X.weight` (fp8) and
    `X.weight_scale_inv` are yielded as stored. Non-FP8 floating tensors are cast to `dtype` if given."""
    root = Path(folder)
    cfg, raw = read_hf_config(root)
    block = block_size_from_config(raw, str(root / CONFIG_NAME))
    with contextlib.ExitStack() as stack:
        reader = _Reader(root, stack)
        _check_folder(reader, cfg, block)
        for name in reader.files:
            if name.endswith(SCALE_SUFFIX) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
                if keep_fp8 and name.endswith(SCALE_SUFFIX):
                    yield name, reader.get(name)
                continue
            t = reader.get(name)
            if t.dtype == FP8_DTYPE:
                if block is None or name + SCALE_SUFFIX not in reader.files:
                    raise ValueError(f"{reader.files[name].name}: {name} is float8 but "
                                     f"{name + SCALE_SUFFIX} or the config's quantization_config is missing")
                if not keep_fp8:
                    t = dequantize_block_fp8(t, reader.get(name + SCALE_SUFFIX), block, dtype or torch.float32)
            elif dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            yield name, t


def load_hf(folder: str | os.PathLike[str], dtype: torch.dtype = torch.float32,
            device: str | torch.device = "cpu") -> tuple[Qwen3MoeForCausalLM, ModelConfig]:
    """Build the model of `folder/config.json` and fill it from the safetensors, one tensor at a time
    (FP8 folders are dequantised). The model is built on the meta device first: no random init cost."""
    cfg, _ = read_hf_config(folder)
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(cfg)
    model = model.to_empty(device=device).to(dtype)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters())
    Fe = cfg.moe_intermediate_size
    with torch.no_grad():
        for name, t in iter_hf_folder(folder, dtype=dtype):
            m = _EXPERT_RE.match(name)
            if m is None:
                params[name].copy_(t)
                continue
            base, j, kind = m.group(1), int(m.group(2)), m.group(3)
            if kind == "down":
                params[base + ".down_proj"][j].copy_(t)
            else:
                rows = slice(0, Fe) if kind == "gate" else slice(Fe, 2 * Fe)
                params[base + ".gate_up_proj"][j, rows].copy_(t)
    return model, cfg


__all__ = ["expected_hf_shapes", "iter_hf_folder", "iter_hf_state", "load_hf", "read_hf_config", "save_hf",
           "should_quantize"]
