"""The engine's one-token decode step over packed weights: few, larger matmuls instead of many small ones.

Why: on CPU a small matmul costs a fixed ~10-40 us whatever its size (dispatch, oneDNN set-up), so a decode
step of the plain model (q, k, v, o, router, and two matmuls per routed expert: ~21 per layer) is dominated by call
count, not flops. Packed, a layer takes 4 calls: one `[q; k; v]` projection, `o`, one matmul for the router
AND every expert's gate/up projection, and one for every expert's down projection. The expert matmuls run
densely over all E experts with the non-routed ones zero-weighted, which spends E/K times the expert flops
but far fewer calls; it is used for decode (few tokens per step), while prefill runs the model's own
sparse forward (`Qwen3MoeForCausalLM.forward_hidden`), which writes the same cache.

Packing costs no memory: `pack_params` builds the packed tensors and returns the model's parameters as
VIEWS into them (the model object stays the single source of truth for prefill and for tests).

Tried and dropped (sampler bench, CPU, 2026-11): fp32 kernels for the small matmuls and attention under
bf16 (~4%, within noise, at the cost of a second copy of those weights and an fp32 KV cache);
`torch.compile` of this step (2 minutes of compilation and a 2x slower step on CPU); oneDNN weight
prepacking (no change); a padded-bmm sparse expert path (slower than dense below ~64 rows per step).

Numerics follow the model (same norms, rotary, router in float32, top-k experts, renormalised gates); only
rounding order differs (fused RMSNorm rounds once in bf16, gates as the softmax of the top-k logits, the
dense expert sum, the routing weight applied before the down projection). In float32/float64 these are
rounding-level differences: greedy tokens, logprobs and routes equal the model's in float64 (tested).

Legend: B rows, D hidden, H query heads, G kv heads, r = H/G, d head dim, S key positions, E experts,
F expert width, K top-k, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM, rotary_cos_sin
from minirl_async.models.routing import replay_gates, router_probs


@dataclass
class Packed:
    layers: list[PackedLayer]
    lm_head: torch.Tensor               # [V, D]


@dataclass
class PackedLayer:
    qkv: torch.Tensor                   # [(H + 2G) d, D]
    qk_norm: torch.Tensor               # [H + G, d]: q_norm weight per query head, then k_norm per kv head
    o: torch.Tensor                     # [D, H d]
    moe_in: torch.Tensor | None         # [E 2F + E, D]: every expert's gate/up rows, then the router
    down: torch.Tensor | None           # [D, E F]: every expert's down projection side by side


def pack_params(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> tuple[Packed, dict[str, torch.Tensor]]:
    """Packed weights and the model parameters re-expressed as views into them.

    Takes ownership of `params`: tensors that need no packing (norms, embeddings, o_proj, lm_head, dense
    MLPs) are used as given, the others become views of new packed tensors. Pass tensors nobody else holds,
    i.e. `weights.prepare_update`'s result (which never shares memory with the caller's state), not a live
    model's parameters: the engine would then change whenever that model does."""
    E, Fe, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    out = dict(params)
    layers: list[PackedLayer] = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        names = [p + f"self_attn.{x}_proj.weight" for x in "qkv"]
        qkv = torch.cat([params[n] for n in names])
        off = 0
        for n in names:
            rows = params[n].shape[0]
            out[n] = qkv[off: off + rows]
            off += rows
        moe_in = down = None
        if cfg.is_moe_layer(i):
            gu, dn, gate = (params[p + "mlp.experts.gate_up_proj"], params[p + "mlp.experts.down_proj"],
                            params[p + "mlp.gate.weight"])
            moe_in = torch.cat([gu.reshape(E * 2 * Fe, D), gate])
            out[p + "mlp.experts.gate_up_proj"] = moe_in[: E * 2 * Fe].view(E, 2 * Fe, D)
            out[p + "mlp.gate.weight"] = moe_in[E * 2 * Fe:]
            down = dn.permute(1, 0, 2).reshape(D, E * Fe).contiguous()          # [D, E F]
            out[p + "mlp.experts.down_proj"] = down.view(D, E, Fe).permute(1, 0, 2)   # [E, D, F] view
        H, G = cfg.num_attention_heads, cfg.num_key_value_heads
        qk_norm = torch.cat([params[p + "self_attn.q_norm.weight"].expand(H, -1),
                             params[p + "self_attn.k_norm.weight"].expand(G, -1)])
        layers.append(PackedLayer(qkv, qk_norm, params[p + "self_attn.o_proj.weight"], moe_in, down))
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])   # tied: absent from params
    return Packed(layers, head), out


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as one fused op (accumulates in float32 for bf16). Bit-identical to `qwen3_moe.RMSNorm` in
    float32/float64; in bf16 it rounds once instead of twice (normalised value, then scaled), so values can
    differ by one bf16 ulp (the model's order matches HF's; the sampler needs speed, not HF's roundings)."""
    if weight.dim() > 1:   # per-head weights [heads, d] (packed q/k norms): normalise per head, then scale
        return F.rms_norm(x, (x.shape[-1],), eps=eps) * weight
    return F.rms_norm(x, (x.shape[-1],), weight=weight, eps=eps)


def _rope(x_BHd: torch.Tensor, cos_Bd: torch.Tensor, sin_Bd: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHd.chunk(2, dim=-1)
    return x_BHd * cos_Bd[:, None] + torch.cat((-x2, x1), dim=-1) * sin_Bd[:, None]


def rope_table(cfg: ModelConfig, max_len: int, dtype: torch.dtype,
               device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin `[max_len, d]` of every position, computed exactly as the model computes them per forward."""
    cos, sin = rotary_cos_sin(torch.arange(max_len, device=device)[None], cfg.head_dim, cfg.rope_theta, dtype)
    return cos[0], sin[0]


@torch.inference_mode()
def decode_step(model: Qwen3MoeForCausalLM, packed: Packed, cache_k: torch.Tensor,
                cache_v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ids_B: torch.Tensor,
                pos_B: torch.Tensor, record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed one token per row (rows 0..B-1 of the cache, token at `pos_B`), return logits `[B, V]` and, if
    `record`, the routed experts `[B, L_moe, K]` (int64). The new keys/values are written into the cache.
    `rope` is `rope_table(...)` of the compute dtype."""
    cfg = model.config
    B = ids_B.shape[0]
    H, G, d, E, K, Fe = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts,
                         cfg.num_experts_per_tok, cfg.moe_intermediate_size)
    r, eps = H // G, cfg.rms_norm_eps
    S = int(pos_B.max()) + 1
    rows_B = torch.arange(B, device=ids_B.device)
    mask_B11S = (torch.arange(S, device=ids_B.device)[None, :] <= pos_B[:, None])[:, None, None, :]
    x_BD = model.model.embed_tokens(ids_B)
    cos_Bd, sin_Bd = rope[0][pos_B], rope[1][pos_B]
    routes: list[torch.Tensor] = []
    for li, (layer, pk) in enumerate(zip(model.model.layers, packed.layers)):
        qkv_BX = F.linear(_norm(x_BD, layer.input_layernorm.weight, eps), pk.qkv)
        # q and k heads normalised and rotated together (per-head ops: the same numbers as separately)
        qk_BXd = _rope(_norm(qkv_BX[:, : (H + G) * d].view(B, H + G, d), pk.qk_norm, eps), cos_Bd, sin_Bd)
        q_BHd, k_BGd = qk_BXd[:, :H], qk_BXd[:, H:]
        v_BGd = qkv_BX[:, (H + G) * d:].view(B, G, d)
        ck, cv = cache_k[li], cache_v[li]
        ck[rows_B, :, pos_B] = k_BGd
        cv[rows_B, :, pos_B] = v_BGd
        # Grouped-query attention without repeating k/v: query head h = g*r + j uses kv head g.
        o_BGrd = F.scaled_dot_product_attention(q_BHd.reshape(B, G, r, d), ck[:B, :, :S], cv[:B, :, :S],
                                                attn_mask=mask_B11S)
        x_BD = x_BD + F.linear(o_BGrd.reshape(B, H * d), pk.o)
        h_BD = _norm(x_BD, layer.post_attention_layernorm.weight, eps)
        if pk.moe_in is None:
            x_BD = x_BD + layer.mlp(h_BD)
            continue
        assert pk.down is not None
        z_BX = F.linear(h_BD, pk.moe_in)
        logits_BE = z_BX[:, E * 2 * Fe:]
        if cfg.norm_topk_prob:
            # softmax is monotonic and renormalised top-k probabilities are the softmax of the top-k logits:
            # the same experts and gates as router_probs + topk + replay_gates, in 3 ops instead of 7
            top = torch.topk(logits_BE.to(torch.float64 if logits_BE.dtype == torch.float64 else torch.float32),
                             K, dim=-1)
            idx_BK, w_BK = top.indices, torch.softmax(top.values, dim=-1).to(x_BD.dtype)
        else:
            probs_BE = router_probs(logits_BE)
            idx_BK = torch.topk(probs_BE, K, dim=-1).indices
            w_BK = replay_gates(probs_BE, idx_BK, False).to(x_BD.dtype)
        gate_BEF, up_BEF = z_BX[:, : E * 2 * Fe].view(B, E, 2 * Fe).split(Fe, dim=-1)
        coef_BE = torch.zeros(B, E, dtype=x_BD.dtype, device=x_BD.device).scatter_(1, idx_BK, w_BK)
        act_BEF = F.silu(gate_BEF) * up_BEF * coef_BE[:, :, None]
        x_BD = x_BD + F.linear(act_BEF.reshape(B, E * Fe), pk.down)
        if record:
            routes.append(idx_BK)
    logits_BV = F.linear(_norm(x_BD, model.model.norm.weight, eps), packed.lm_head)
    return logits_BV, (torch.stack(routes, dim=1) if record and routes else None)
