"""Qwen3-MoE model with router RECORD/REPLAY, HF safetensors I/O and the block-FP8 quantiser.

    from minirl_async.models import ModelConfig, Qwen3MoeForCausalLM, Routing, load_hf, save_hf
"""

from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import dequantize_block_fp8, quantize_block_fp8, quantize_state
from minirl_async.models.hf_io import iter_hf_folder, iter_hf_state, load_hf, save_hf
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM
from minirl_async.models.routing import Routing, batch_routes, routes_dtype

__all__ = ["ModelConfig", "Qwen3MoeForCausalLM", "Routing", "batch_routes", "dequantize_block_fp8",
           "iter_hf_folder", "iter_hf_state", "load_hf", "quantize_block_fp8", "quantize_state", "routes_dtype",
           "save_hf"]
