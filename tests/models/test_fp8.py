"""Block-FP8: the quantiser against a plain per-tile loop, the e4m3 error bound (and that it is tight),
FP8 HF folders (which weights are FP8, raw and dequantised reads) and round trips of a saved model.

    pytest tests/models/test_fp8.py -q
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import (
    FP8_DTYPE,
    dequantize_block_fp8,
    quantize_block_fp8,
    should_quantize,
)
from minirl_async.models.hf_io import iter_hf_folder, iter_hf_state, load_hf, save_hf
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM


def reference_quantize(w: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile at a time, the way DeepSeek-V3's reference conversion does it."""
    N, M = w.shape
    n, m = -(-N // b), -(-M // b)
    q = torch.empty(N, M, dtype=FP8_DTYPE)
    s = torch.empty(n, m)
    for i in range(n):
        for j in range(m):
            tile = w[i * b:(i + 1) * b, j * b:(j + 1) * b].float()
            s[i, j] = tile.abs().max().clamp(min=1e-12) / 448.0
            q[i * b:(i + 1) * b, j * b:(j + 1) * b] = (tile / s[i, j]).clamp(-448, 448).to(FP8_DTYPE)
    return q, s


def scale_per_element(s_nm: torch.Tensor, b: int, N: int, M: int) -> torch.Tensor:
    return s_nm.repeat_interleave(b, 0).repeat_interleave(b, 1)[:N, :M]


@pytest.mark.parametrize("shape,block", [((37, 70), 16), ((128, 128), 128), ((5, 3), 4), ((20, 33), 8)])
def test_quantize_matches_per_tile_reference_and_error_bound(shape: tuple[int, int], block: int) -> None:
    torch.manual_seed(0)
    N, M = shape
    # columns spanning 8 decades so tiles contain values in e4m3's subnormal range as well
    w = torch.randn(N, M) * torch.logspace(-6, 2, M)
    q, s = quantize_block_fp8(w, block)
    q_ref, s_ref = reference_quantize(w, block)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (-(-N // block), -(-M // block))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
    d = dequantize_block_fp8(q, s, block, torch.float32)
    # e4m3: 3 mantissa bits -> half-ulp relative error 2^-4 for normal values (|w/s| >= 2^-6); below that the
    # subnormal spacing is 2^-9, so the absolute error is <= 2^-10 in scaled units, i.e. 2^-10 * s.
    S = scale_per_element(s, block, N, M)
    bound = torch.maximum(2.0**-4 * w.abs(), 2.0**-10 * S) * (1 + 2.0**-20) + 1e-30
    ratio = (d - w).abs() / bound
    assert ratio.max() <= 1.0
    if N * M > 100:
        assert ratio.max() > 0.5  # the bound is nearly attained: the test would notice a coarser format


def test_quantize_edge_cases() -> None:
    z = torch.zeros(6, 6)
    q, s = quantize_block_fp8(z, 4)
    assert torch.isfinite(s).all() and (s > 0).all()
    assert torch.equal(dequantize_block_fp8(q, s, 4), z)
    stacked = torch.randn(3, 10, 12)  # stacked experts [E, N, M]: same as quantising each matrix
    q3, s3 = quantize_block_fp8(stacked, 8)
    for e in range(3):
        qe, se = quantize_block_fp8(stacked[e], 8)
        assert torch.equal(q3[e].view(torch.uint8), qe.view(torch.uint8)) and torch.equal(s3[e], se)
    torch.testing.assert_close(dequantize_block_fp8(q3, s3, 8)[1], dequantize_block_fp8(*quantize_block_fp8(
        stacked[1], 8), 8))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \(1, 1\), expected \(2, 2\)"):
        dequantize_block_fp8(q3[0], torch.ones(1, 1), 8)
    with pytest.raises(ValueError, match="block size must be >= 1"):
        quantize_block_fp8(z, 0)
    with pytest.raises(ValueError, match="quantises matrices"):
        quantize_block_fp8(torch.ones(4), 2)


def test_which_weights_are_quantised() -> None:
    yes = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.o_proj.weight",
           "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
           "model.layers.2.mlp.experts.17.up_proj.weight", "model.layers.2.mlp.experts.0.gate_proj.weight"]
    no = ["model.layers.2.mlp.gate.weight", "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight",
          "model.layers.0.self_attn.q_norm.weight", "model.layers.0.input_layernorm.weight"]
    assert all(should_quantize(n) for n in yes) and not any(should_quantize(n) for n in no)


def tiny_model() -> tuple[Qwen3MoeForCausalLM, ModelConfig]:
    # moe_intermediate_size 12 and hidden 24 are not multiples of the block 8: padded tiles are exercised
    cfg = ModelConfig(vocab_size=40, hidden_size=24, intermediate_size=20, moe_intermediate_size=12,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_experts=4,
                      num_experts_per_tok=2, mlp_only_layers=[0])
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(cfg), cfg


def test_fp8_folder_raw_and_dequantised(tmp_path: Path) -> None:
    model, cfg = tiny_model()
    save_hf(model, cfg, tmp_path, fp8_block_size=8)
    hf_cfg = json.loads((tmp_path / "config.json").read_text())
    assert hf_cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                             "weight_block_size": [8, 8]}
    orig = dict(iter_hf_state(model))
    raw = dict(iter_hf_folder(tmp_path, keep_fp8=True))
    quantised = [n for n in orig if should_quantize(n)]
    assert len(quantised) == 2 * 4 + 3 + 4 * 3  # attention of 2 layers, dense MLP (layer 0), 4 experts x 3
    assert set(raw) == set(orig) | {n + "_scale_inv" for n in quantised}
    for n, w in orig.items():
        if should_quantize(n):
            q, s = quantize_block_fp8(w, 8)
            assert raw[n].dtype == FP8_DTYPE and torch.equal(raw[n].view(torch.uint8), q.view(torch.uint8)), n
            assert torch.equal(raw[n + "_scale_inv"], s), n
        else:
            assert torch.equal(raw[n], w), n  # router, norms, embedding, lm_head stay full precision
    loaded, cfg2 = load_hf(tmp_path)
    assert cfg2 == cfg
    for n, w in iter_hf_state(loaded):
        want = dequantize_block_fp8(*quantize_block_fp8(orig[n], 8), 8) if should_quantize(n) else orig[n]
        assert torch.equal(w, want), n


def test_quantise_dequantise_saved_model_round_trips(tmp_path: Path) -> None:
    """bf16 -> FP8 folder -> dequantised model -> FP8 folder again gives the same FP8 bytes and scales
    (dequantised weights are fixed points of the quantiser), and the dequantised model stays close."""
    model, cfg = tiny_model()
    save_hf(model, cfg, tmp_path / "a", fp8_block_size=8)
    deq, _ = load_hf(tmp_path / "a")
    save_hf(deq, cfg, tmp_path / "b", fp8_block_size=8)
    a = dict(iter_hf_folder(tmp_path / "a", keep_fp8=True))
    b = dict(iter_hf_folder(tmp_path / "b", keep_fp8=True))
    assert a.keys() == b.keys()
    for n in a:
        assert torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)), n
    ids = torch.randint(0, cfg.vocab_size, (2, 8))
    ref = model(ids)
    assert (deq(ids) - ref).abs().max() < 0.1 * ref.abs().max()
