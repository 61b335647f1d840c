"""ModelConfig: the architecture of a Qwen3-MoE causal LM, with HF `Qwen3MoeConfig` field names.

It converts to/from the `config.json` of a Hugging Face folder (`to_hf_dict` / `from_hf_dict`) and from the
`model.arch` section of the run config (`from_arch`). Layer `i` is a MoE layer when it is not listed in
`mlp_only_layers` and `(i + 1) % decoder_sparse_step == 0` (HF's rule); `moe_layer_ids` lists them, and
routing tensors carry one "layer" entry per MoE layer, in that order.

    cfg = ModelConfig.from_arch(run_cfg.model.arch, vocab_size=tok.vocab_size)
    json.dump(cfg.to_hf_dict(), f)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from minirl_async.config import ModelArch

HF_ARCHITECTURE = "Qwen3MoeForCausalLM"
HF_MODEL_TYPE = "qwen3_moe"
# transformers' Qwen3MoeConfig defaults, used for keys a config.json leaves out (they differ from ours).
_HF_DEFAULTS: dict[str, Any] = {
    "intermediate_size": 6144, "moe_intermediate_size": 768, "num_key_value_heads": 4, "num_experts": 128,
    "num_experts_per_tok": 8, "norm_topk_prob": False, "decoder_sparse_step": 1, "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0, "max_position_embeddings": 32768, "tie_word_embeddings": False,
}


@dataclass
class ModelConfig:
    """Qwen3-MoE architecture. Field names and meanings are exactly those of HF `Qwen3MoeConfig`."""

    vocab_size: int = 256
    """Vocabulary size (rows of the embedding and of the LM head)."""
    hidden_size: int = 64
    """Width of the residual stream."""
    intermediate_size: int = 128
    """FFN width of dense (non-MoE) layers."""
    moe_intermediate_size: int = 32
    """FFN width of each expert."""
    num_hidden_layers: int = 2
    """Number of transformer blocks."""
    num_attention_heads: int = 4
    """Query heads."""
    num_key_value_heads: int = 2
    """Key/value heads (grouped-query attention); divides num_attention_heads."""
    head_dim: int = 16
    """Per-head width (Qwen3 decouples it from hidden_size / num_attention_heads)."""
    num_experts: int = 8
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = 2
    """Top-k experts per token."""
    norm_topk_prob: bool = True
    """Renormalise the kept top-k router probabilities to sum to one."""
    decoder_sparse_step: int = 1
    """Every `decoder_sparse_step`-th layer is MoE (1 = all)."""
    mlp_only_layers: list[int] = field(default_factory=list)
    """Layer indices forced to a dense MLP."""
    rms_norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    rope_theta: float = 10000.0
    """Rotary embedding base."""
    max_position_embeddings: int = 512
    """Longest sequence the model is meant to handle (rotary has no table, so this is advisory)."""
    tie_word_embeddings: bool = False
    """Share the input embedding matrix with the LM head."""
    initializer_range: float = 0.02
    """Std of the normal initialisation of linear, embedding, router and expert weights."""
    bos_token_id: int | None = None
    """Beginning-of-sequence token id (metadata only)."""
    eos_token_id: int | list[int] | None = None
    """End-of-sequence token id(s) (metadata only)."""
    pad_token_id: int | None = None
    """Padding token id; as in HF its embedding row gets no gradient."""

    def __post_init__(self) -> None:
        self.mlp_only_layers = [int(i) for i in self.mlp_only_layers]
        positive = ("vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size",
                    "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
                    "num_experts_per_tok", "decoder_sparse_step")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"model config: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"model config: num_key_value_heads={self.num_key_value_heads} must divide "
                             f"num_attention_heads={self.num_attention_heads}")
        if self.head_dim % 2:
            raise ValueError(f"model config: head_dim={self.head_dim} must be even (rotary embedding)")
        if self.num_experts > 0 and self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"model config: num_experts_per_tok={self.num_experts_per_tok} must be <= "
                             f"num_experts={self.num_experts}")
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"model config: pad_token_id={self.pad_token_id} outside [0, vocab_size)")

    # ---- layer layout -------------------------------------------------------------------------------
    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF's rule: a sparse block unless listed in mlp_only_layers or off the decoder_sparse_step grid."""
        return (layer_idx not in self.mlp_only_layers and self.num_experts > 0
                and (layer_idx + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layer_ids(self) -> list[int]:
        """Indices of the MoE layers; routing tensors have one 'layer' entry per element, in this order."""
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layer_ids)

    # ---- conversions ----------------------------------------------------------------------------------
    @classmethod
    def from_arch(cls, arch: ModelArch, vocab_size: int, *, bos_token_id: int | None = None,
                  eos_token_id: int | list[int] | None = None,
                  pad_token_id: int | None = None) -> ModelConfig:
        """Build from the run config's `model.arch` section; `vocab_size` comes from the tokenizer
        (it wins over `arch.vocab_size`, which may be 0 = 'take it from the tokenizer')."""
        if vocab_size < 1:
            raise ValueError(f"model config: vocab_size must be >= 1, got {vocab_size}; "
                             "pass the tokenizer's vocabulary size")
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if hasattr(arch, f.name):
                kw[f.name] = getattr(arch, f.name)
        kw["vocab_size"] = vocab_size
        kw["mlp_only_layers"] = list(kw.get("mlp_only_layers", []))
        return cls(**kw, bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    def to_hf_dict(self) -> dict[str, Any]:
        """The `config.json` content of an HF Qwen3-MoE folder (transformers and SGLang read it)."""
        d = dataclasses.asdict(self)
        d.update({
            "architectures": [HF_ARCHITECTURE],
            "model_type": HF_MODEL_TYPE,
            "hidden_act": "silu",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": self.num_hidden_layers,
            "rope_scaling": None,
            # transformers 5 reads rope_parameters, earlier versions (and SGLang's) rope_theta: write both.
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "output_router_logits": False,
            "router_aux_loss_coef": 0.001,
            "use_cache": True,
        })
        return d

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Parse an HF `config.json` dict; rejects other architectures and features this model lacks."""
        arch = d.get("architectures") or []
        if d.get("model_type") != HF_MODEL_TYPE:
            raise ValueError(f"{source}: model_type is {d.get('model_type')!r}; only {HF_MODEL_TYPE!r} "
                             f"(architectures {[HF_ARCHITECTURE]}) is supported")
        if arch and HF_ARCHITECTURE not in arch:
            raise ValueError(f"{source}: architectures {arch} does not contain {HF_ARCHITECTURE!r}")
        for key, ok in (("hidden_act", "silu"), ("attention_bias", False)):
            if d.get(key, ok) != ok:
                raise ValueError(f"{source}: {key}={d[key]!r} is not supported (only {ok!r})")
        if d.get("use_sliding_window"):
            raise ValueError(f"{source}: use_sliding_window=true is not supported")
        rope_params = d.get("rope_parameters") or {}
        scaling = d.get("rope_scaling") or None
        # "type" is the pre-4.45 transformers spelling of "rope_type" (still found in many config.json files)
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", rope_params.get("rope_type", "default")))
        if rope_type != "default":
            raise ValueError(f"{source}: rope type {rope_type!r} is not supported (only default rotary)")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names}
        if "num_experts" not in kw and "num_local_experts" in d:  # transformers 5 writes this alias
            kw["num_experts"] = d["num_local_experts"]
        if "rope_theta" not in kw and "rope_theta" in rope_params:
            kw["rope_theta"] = rope_params["rope_theta"]
        kw = {**_HF_DEFAULTS, **kw}
        if "head_dim" not in kw or kw["head_dim"] is None:
            kw["head_dim"] = d["hidden_size"] // d["num_attention_heads"]
        if kw.get("mlp_only_layers") is None:
            kw["mlp_only_layers"] = []
        missing = [n for n in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads")
                   if n not in kw]
        if missing:
            raise ValueError(f"{source}: missing required field(s) {missing}")
        return cls(**kw)
