"""Qwen3-MoE model with router RECORD/REPLAY, HF safetensors I/O and the block-FP8 quantiser.

    from minirl_async.models import ModelConfig, Qwen3MoeForCausalLM, Routing
"""

from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM
from minirl_async.models.routing import Routing, routes_dtype

__all__ = ["ModelConfig", "Qwen3MoeForCausalLM", "Routing", "routes_dtype"]
