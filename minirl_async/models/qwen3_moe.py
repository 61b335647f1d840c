"""Qwen3-MoE causal LM in plain PyTorch, numerically the same as transformers' `Qwen3MoeForCausalLM`.

Architecture only: FSDP wrapping, compile, KV-cache storage and routing transport come from outside through
explicit arguments (`routing`, `kv_cache`, `attn_mask`, `position_ids`). Parameter names follow HF's
in-memory naming, so `state_dict()` keys equal HF's (transformers 5.x stores experts stacked, like us):

    model.embed_tokens.weight                         [V, D]
    model.layers.{i}.input_layernorm.weight           [D]
    model.layers.{i}.self_attn.{q,k,v,o}_proj.weight  [H*hd, D], [Hkv*hd, D], [Hkv*hd, D], [D, H*hd]
    model.layers.{i}.self_attn.{q,k}_norm.weight      [hd]
    model.layers.{i}.post_attention_layernorm.weight  [D]
    MoE layer:   model.layers.{i}.mlp.gate.weight              [E, D]      router
                 model.layers.{i}.mlp.experts.gate_up_proj     [E, 2F, D]  rows 0..F-1 gate, F..2F-1 up
                 model.layers.{i}.mlp.experts.down_proj        [E, D, F]
    dense layer: model.layers.{i}.mlp.{gate,up}_proj.weight    [I, D];  mlp.down_proj.weight [D, I]
    model.norm.weight [D];  lm_head.weight [V, D] (the same Parameter as embed_tokens when tied)

On disk (hf_io.py) experts are split per expert: `mlp.experts.{j}.{gate,up,down}_proj.weight`.
Any dtype works: `model.to(torch.bfloat16)`; norms, rotary and the router softmax run in float32 (float64
when the model is float64), as HF does.

Legend: B batch, T query tokens, S key tokens (cache + new), D hidden, H query heads, Hkv kv heads,
hd head dim, V vocab, E experts, K top-k, F expert FFN width, I dense FFN width, N flattened tokens (B*T),
L MoE layers.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from minirl_async.models.config import ModelConfig
from minirl_async.models.routing import Routing, replay_gates, router_probs, routes_dtype


class KVCache(Protocol):
    """What the model needs from a cache; the engine owns the storage. `update` appends the new keys and
    values of layer `layer_idx` and returns all keys/values the new queries may attend to."""

    def update(self, layer_idx: int, k_BHTd: torch.Tensor,
               v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 and cast back before the weight multiply: exactly HF's order of roundings.
        h = x.to(_compute_dtype(x))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rotary_cos_sin(position_ids_BT: torch.Tensor, head_dim: int, theta: float,
                   dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[B, T, hd]` for the given positions. Computed on the fly (no buffer) so that
    `model.to(bfloat16)` cannot round the frequencies; float32 like HF (float64 for float64 models)."""
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    dev = position_ids_BT.device
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=dev) / head_dim))
    freqs_BTh = position_ids_BT[..., None].to(cdt) * inv_freq.to(cdt)
    emb_BTd = torch.cat((freqs_BTh, freqs_BTh), dim=-1)
    return emb_BTd.cos().to(dtype), emb_BTd.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = (cfg.num_attention_heads, cfg.num_key_value_heads,
                                                            cfg.head_dim)
        D, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(D, self.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, self.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(self.num_heads * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, cfg.rms_norm_eps)  # Qwen3: per-head RMSNorm of q and k before rotary
        self.k_norm = RMSNorm(hd, cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor,
                attn_mask: torch.Tensor | None, kv_cache: KVCache | None) -> torch.Tensor:
        B, T, _ = x_BTD.shape
        q_BHTd = self.q_norm(self.q_proj(x_BTD).view(B, T, self.num_heads, self.head_dim)).transpose(1, 2)
        k_BHTd = self.k_norm(self.k_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim)).transpose(1, 2)
        v_BHTd = self.v_proj(x_BTD).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = cos_BTd[:, None], sin_BTd[:, None]
        q_BHTd = q_BHTd * cos + _rotate_half(q_BHTd) * sin
        k_BHTd = k_BHTd * cos + _rotate_half(k_BHTd) * sin
        if kv_cache is not None:
            k_BHSd, v_BHSd = kv_cache.update(self.layer_idx, k_BHTd, v_BHTd)
        else:
            k_BHSd, v_BHSd = k_BHTd, v_BHTd
        S = k_BHSd.shape[2]
        is_causal = False
        if attn_mask is None:
            if S == T:
                is_causal = True
            elif T > 1:
                # Cached prefix + T new tokens: causal aligned to the bottom right (new token i sees S-T+i).
                q_pos = torch.arange(S - T, S, device=x_BTD.device)
                attn_mask = (torch.arange(S, device=x_BTD.device)[None, :] <= q_pos[:, None])[None, None]
        # Repeat kv heads ourselves: SDPA's enable_gqa does not cover every backend/mask combination.
        rep = self.num_heads // self.num_kv_heads
        if rep > 1:
            k_BHSd = k_BHSd.repeat_interleave(rep, dim=1)
            v_BHSd = v_BHSd.repeat_interleave(rep, dim=1)
        o_BHTd = F.scaled_dot_product_attention(q_BHTd, k_BHSd, v_BHSd, attn_mask=attn_mask, is_causal=is_causal)
        return self.o_proj(o_BHTd.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """Dense SwiGLU FFN (non-MoE layers)."""

    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor,
                    gate_up_EFD: torch.Tensor, down_EDF: torch.Tensor) -> torch.Tensor:
    """sum_k w[n,k] * expert_{idx[n,k]}(x[n]) with the (token, k) pairs sorted by expert, so each expert
    runs one matmul on its contiguous slice (the loop is over experts, never over tokens).
    `gate_up_EFD` is `[E, 2F, D]` (gate rows then up rows), `down_EDF` is `[E, D, F]`."""
    N, K = idx_NK.shape
    E = gate_up_EFD.shape[0]
    flat_idx = idx_NK.reshape(-1)
    order = torch.argsort(flat_idx, stable=True)         # (token, k) pairs grouped by expert
    token_of = order // K
    counts = torch.bincount(flat_idx, minlength=E).tolist()
    x_sorted = x_ND[token_of]
    outs = []
    for e, x_e in enumerate(torch.split(x_sorted, counts)):
        if x_e.shape[0] == 0:
            continue
        gate, up = F.linear(x_e, gate_up_EFD[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(gate) * up, down_EDF[e]))
    y_sorted = torch.cat(outs) if outs else x_sorted.new_zeros(0, x_ND.shape[1])
    y_sorted = y_sorted * w_NK.reshape(-1)[order, None].to(y_sorted.dtype)
    return torch.zeros_like(x_ND).index_add(0, token_of, y_sorted)


class Experts(nn.Module):
    """The E routed experts of one layer as stacked parameters (HF transformers-5 in-memory layout)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        E, D, Fe = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(E, 2 * Fe, D))
        self.down_proj = nn.Parameter(torch.empty(E, D, Fe))

    def forward(self, x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor) -> torch.Tensor:
        return grouped_experts(x_ND, idx_NK, w_NK, self.gate_up_proj, self.down_proj)


class SparseMoeBlock(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.top_k, self.norm_topk_prob = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # router, HF name `mlp.gate`
        self.experts = Experts(cfg)

    def forward(self, x_BTD: torch.Tensor,
                replay_BTK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns the block output and the expert indices used `[B, T, K]` (int64)."""
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(B * T, D)
        probs_NE = router_probs(self.gate(x_ND))
        if replay_BTK is None:
            idx_NK = torch.topk(probs_NE, self.top_k, dim=-1).indices
        else:
            idx_NK = replay_BTK.reshape(B * T, self.top_k)
        w_NK = replay_gates(probs_NE, idx_NK, self.norm_topk_prob).to(x_BTD.dtype)
        y_ND = self.experts(x_ND, idx_NK, w_NK)
        return y_ND.view(B, T, D), idx_NK.view(B, T, self.top_k)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.self_attn = Attention(cfg, layer_idx)
        self.mlp: nn.Module = SparseMoeBlock(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x_BTD: torch.Tensor, cos_BTd: torch.Tensor, sin_BTd: torch.Tensor,
                attn_mask: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                replay_BTK: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Returns the new residual stream and, for MoE layers, the expert indices used `[B, T, K]`."""
        x_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTd, sin_BTd, attn_mask, kv_cache)
        h_BTD = self.post_attention_layernorm(x_BTD)
        if self.is_moe:
            y_BTD, idx_BTK = self.mlp(h_BTD, replay_BTK)
            return x_BTD + y_BTD, idx_BTK
        return x_BTD + self.mlp(h_BTD), None


class Qwen3MoeModel(nn.Module):
    """Embedding, decoder layers and final norm (HF's `model.` prefix)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size, padding_idx=cfg.pad_token_id)
        self.layers = nn.ModuleList([DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class Qwen3MoeForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Qwen3MoeModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """HF's initialisation: normal(0, initializer_range) for every matrix, ones for norms, zero pad row.
        Call again after materialising a meta-device model."""
        std = self.config.initializer_range
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, std, generator=generator)
        if self.config.pad_token_id is not None:
            self.model.embed_tokens.weight[self.config.pad_token_id].zero_()

    def forward_hidden(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                       routing: Routing | None = None, kv_cache: Any | None = None,
                       attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Final-normed hidden states `[B, T, D]`. See `forward` for the arguments."""
        cfg = self.config
        B, T = input_ids_BT.shape
        if position_ids_BT is None:
            if kv_cache is not None:
                raise ValueError("position_ids_BT is required with a kv_cache (the model cannot know the "
                                 "cache length); pass the absolute positions of the new tokens")
            position_ids_BT = torch.arange(T, device=input_ids_BT.device).expand(B, T)
        x_BTD = self.model.embed_tokens(input_ids_BT)
        cos_BTd, sin_BTd = rotary_cos_sin(position_ids_BT, cfg.head_dim, cfg.rope_theta, x_BTD.dtype)
        mode = routing.mode if routing is not None else "free"
        replay_BTLK = None
        if mode == "replay":
            assert routing is not None
            replay_BTLK = routing.check_replay(B, T, cfg.num_moe_layers, cfg.num_experts_per_tok,
                                               cfg.num_experts).to(input_ids_BT.device)
        recorded: list[torch.Tensor] = []
        moe_slot = 0
        for layer in self.model.layers:
            replay_BTK = None
            if replay_BTLK is not None and layer.is_moe:
                replay_BTK = replay_BTLK[:, :, moe_slot]
            x_BTD, idx_BTK = layer(x_BTD, cos_BTd, sin_BTd, attn_mask, kv_cache, replay_BTK)
            if idx_BTK is not None:
                moe_slot += 1
                if mode == "record":
                    recorded.append(idx_BTK)
        if mode == "record":
            assert routing is not None
            rdt = routes_dtype(max(cfg.num_experts, 1))
            routing.recorded_BTLK = (torch.stack(recorded, dim=2).to(rdt) if recorded
                                     else torch.zeros(B, T, 0, cfg.num_experts_per_tok, dtype=rdt))
        return self.model.norm(x_BTD)

    def forward(self, input_ids_BT: torch.Tensor, position_ids_BT: torch.Tensor | None = None,
                routing: Routing | None = None, kv_cache: Any | None = None,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits `[B, T, V]`.

        position_ids_BT: absolute positions (default 0..T-1; required with `kv_cache`).
        routing: router mode (`Routing`); None = free routing.
        kv_cache: object with `update(layer_idx, k_BHTd, v_BHTd) -> (k_BHSd, v_BHSd)`.
        attn_mask: bool `[B, 1, T, S]` (True = may attend) or an additive float mask; None = causal
            (aligned to the end of the cache when a cache is given). A query row that may attend to nothing
            gives NaN (SDPA semantics): let padding rows attend at least to themselves.
        """
        return self.lm_head(self.forward_hidden(input_ids_BT, position_ids_BT, routing, kv_cache, attn_mask))
