"""services/real.py adapters: a WeightSet whose FP8 format is not the sampler's is refused before the engine
sees it (the engines only check scale shapes, which coincide across blocks for small tensors)."""

from __future__ import annotations

import pytest
import torch
from minirl_async.proto.weights import WeightSet
from minirl_async.services.real import RealEngine, check_weight_format

from minirl_async.config import Config
from minirl_async.engine.base import WeightUpdateError
from minirl_async.engine.torch_fp8 import TorchFP8Engine
from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import quantize_state
from minirl_async.models.hf_io import iter_hf_state
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM


def ws(fp8: bool, block: int, tensors: dict[str, torch.Tensor] | None = None, version: int = 1) -> WeightSet:
    return WeightSet(version, tensors or {}, fp8, block)


@pytest.mark.parametrize(("ws_fp8", "ws_block", "fp8", "block", "ok"), [
    (True, 128, True, 128, True),
    (False, 0, False, 128, True),       # plain weights for a non-FP8 sampler (its block is unused)
    (True, 128, True, 64, False),       # the wrong block
    (True, 64, False, 64, False),       # FP8 weights for a sampler loaded unquantised
    (False, 0, True, 128, False),       # plain weights for an FP8 sampler: the learner runs another config
])
def test_check_weight_format(ws_fp8: bool, ws_block: int, fp8: bool, block: int, ok: bool) -> None:
    if ok:
        check_weight_format(ws(ws_fp8, ws_block), fp8=fp8, fp8_block=block)
    else:
        with pytest.raises(WeightUpdateError, match="refused.*sampler.fp8 and model.fp8_block_size"):
            check_weight_format(ws(ws_fp8, ws_block), fp8=fp8, fp8_block=block)


def test_real_engine_refuses_a_block_mismatch_whose_scale_shapes_coincide() -> None:
    # every projection is at most 64 x 64: its scale is 1 x 1 with block 64 and with block 128 alike
    mcfg = ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       num_experts=4, num_experts_per_tok=2, max_position_embeddings=16)
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(mcfg).requires_grad_(False)
    cfg = Config()
    cfg.sampler.fp8, cfg.model.fp8_block_size = True, 64
    real = RealEngine.__new__(RealEngine)            # without a checkpoint folder and tokenizer
    real.cfg, real.index = cfg, 0
    real.engine = TorchFP8Engine(mcfg, fp8=True, fp8_block=64, dtype=torch.float32)
    wrong = dict(quantize_state(iter_hf_state(model), 128))
    real.engine.update_weights(0, wrong)             # the engine alone cannot tell: the shapes fit block 64
    with pytest.raises(WeightUpdateError, match="block-FP8 with block 128 but this sampler expects block-FP8 "
                                                "with block 64"):
        real.update_weights(ws(True, 128, wrong, version=1))
    assert real.version == 0
    real.update_weights(ws(True, 64, dict(quantize_state(iter_hf_state(model), 64)), version=1))
    assert real.version == 1
