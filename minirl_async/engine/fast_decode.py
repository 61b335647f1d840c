"""The engine's one-token decode step over packed weights: few, larger matmuls instead of many small ones.

Why: on CPU a small matmul costs a fixed ~10-40 us whatever its size (dispatch, oneDNN set-up), so a decode
step of the plain model (q, k, v, o, router, and two matmuls per routed expert: ~21 per layer) is dominated by call
count, not flops. Packed, a layer takes 4 calls: one `[q; k; v]` projection, `o`, one matmul for the router
AND every expert's gate/up projection, and one for every expert's down projection. The expert matmuls run
densely over all E experts with the non-routed ones zero-weighted, which spends E/K times the expert flops
but far fewer calls; it is used for decode (few tokens per step), while prefill runs the model's own
sparse forward (`Qwen3MoeForCausalLM.forward_hidden`), which writes the same cache.

Packing costs little memory: `pack_params` builds the packed tensors and returns the model's parameters as
VIEWS into them (the model object stays the single source of truth for prefill and for tests); the only
extra copy is `rotate_half` of the q/k rows, which turns qk-norm + rotary into 3 ops per layer.

Beyond the matmuls, each small op costs ~5-20 us in the step (Python, dispatch, and kernels that run ~2x
slower between other ops than in a tight loop), so the step is written for op count: weights come from
`Packed` (no nn.Module lookups), the attention mask and cache indices are built once per step (an additive
mask: a bool one is converted by every attention call), views are taken with split/unbind, the KV write
is an index_copy_ into a flat view. Profile of a bf16 step (B 16, 4 layers): attention block ~55% (the
CPU bf16 flash-attention kernel alone ~25%), MoE block ~45%; about a fifth of the CPU time is the Python
interpreter.

Tried and dropped (sampler bench, CPU, 2026-11): fp32 kernels for the small matmuls and attention under
bf16 (~4%, within noise, at the cost of a second copy of those weights and an fp32 KV cache);
`torch.compile` of this step (2 minutes of compilation and a 2x slower step on CPU); oneDNN weight
prepacking (no change); a padded-bmm sparse expert path (slower than dense below ~64 rows per step).
Also (2026-12, generate of 16 x 128 tokens, paired runs): a float32 KV cache with float32 attention under
bf16 (the bf16 sdpa alone is ~2x slower than float32 in isolation, but the whole generate was 0.99x,
quartiles 0.92-1.10); bmm/baddbmm attention instead of sdpa, and float32 sdpa on converted slices (0-3%);
addmm for the residual adds (no gain); TorchScript of the layer loop (~7% faster step, not worth a
deprecated frontend); transparent huge pages for the packed weights and cache (2-5%, noise level);
garbage collection is not a factor (no collection runs during a generate).

Numerics follow the model (same norms, rotary, router in float32, top-k experts, renormalised gates); only
rounding order differs (fused RMSNorm rounds once in bf16, the q/k-norm weight folded into the rotary
cos/sin, gates as the softmax of the top-k logits, the dense expert sum, the routing weight applied before
the down projection). In float32/float64 these are
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
    embed: torch.Tensor                 # [V, D]
    norm: torch.Tensor                  # [D] final norm
    lm_head: torch.Tensor               # [V, D]
    qk_norm: torch.Tensor               # [L, H + G, d]: q_norm weight per query head, then k_norm per kv head
    qk_norm_swapped: torch.Tensor       # [L, H + G, d]: the same with the two halves of d swapped


@dataclass
class PackedLayer:
    in_norm: torch.Tensor               # [D] input_layernorm
    qkv: torch.Tensor                   # [(2 (H + G) + G) d, D]: q, k, rotate_half(q), rotate_half(k), v rows
    o: torch.Tensor                     # [D, H d]
    post_norm: torch.Tensor             # [D] post_attention_layernorm
    moe_in: torch.Tensor | None         # [E 2F + E, D]: every expert's gate/up rows, then the router
    down: torch.Tensor | None           # [D, E F]: every expert's down projection side by side


def pack_params(cfg: ModelConfig, params: dict[str, torch.Tensor]) -> tuple[Packed, dict[str, torch.Tensor]]:
    """Packed weights and the model parameters re-expressed as views into them.

    Takes ownership of `params`: tensors that need no packing (norms, embeddings, o_proj, lm_head, dense
    MLPs) are used as given, the others become views of new packed tensors. Pass tensors nobody else holds,
    i.e. `weights.prepare_update`'s result (which never shares memory with the caller's state), not a live
    model's parameters: the engine would then change whenever that model does.

    The one extra copy: the q and k rows again, each head's halves swapped and the first half negated
    (`rotate_half` of the projection, an exact signed permutation), so rotary embedding needs no per-step
    shuffle (`decode_step`). It costs (H + G) d x D per layer, i.e. less than the q/k/v projections."""
    E, Fe, D = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
    H, G, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    out = dict(params)
    layers: list[PackedLayer] = []
    qk_norms = []
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k, v = (params[p + f"self_attn.{x}_proj.weight"] for x in "qkv")
        qk = torch.cat([q, k]).view(H + G, 2, d // 2, D)
        rot = torch.cat((-qk[:, 1:], qk[:, :1]), dim=1).reshape((H + G) * d, D)
        qkv = torch.cat([q, k, rot, v])
        out[p + "self_attn.q_proj.weight"] = qkv[: H * d]
        out[p + "self_attn.k_proj.weight"] = qkv[H * d: (H + G) * d]
        out[p + "self_attn.v_proj.weight"] = qkv[2 * (H + G) * d:]
        moe_in = down = None
        if cfg.is_moe_layer(i):
            gu, dn, gate = (params[p + "mlp.experts.gate_up_proj"], params[p + "mlp.experts.down_proj"],
                            params[p + "mlp.gate.weight"])
            moe_in = torch.cat([gu.reshape(E * 2 * Fe, D), gate])
            out[p + "mlp.experts.gate_up_proj"] = moe_in[: E * 2 * Fe].view(E, 2 * Fe, D)
            out[p + "mlp.gate.weight"] = moe_in[E * 2 * Fe:]
            down = dn.permute(1, 0, 2).reshape(D, E * Fe).contiguous()          # [D, E F]
            out[p + "mlp.experts.down_proj"] = down.view(D, E, Fe).permute(1, 0, 2)   # [E, D, F] view
        qk_norms.append(torch.cat([params[p + "self_attn.q_norm.weight"].expand(H, -1),
                                   params[p + "self_attn.k_norm.weight"].expand(G, -1)]))
        layers.append(PackedLayer(params[p + "input_layernorm.weight"], qkv, params[p + "self_attn.o_proj.weight"],
                                  params[p + "post_attention_layernorm.weight"], moe_in, down))
    embed = params["model.embed_tokens.weight"]
    head = params.get("lm_head.weight", embed)   # tied: absent from params
    qk_norm = torch.stack(qk_norms)
    swapped = torch.cat((qk_norm[..., d // 2:], qk_norm[..., : d // 2]), dim=-1)
    return Packed(layers, embed, params["model.norm.weight"], head, qk_norm, swapped), out


def _norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """RMSNorm as one fused op (accumulates in float32 for bf16). Bit-identical to `qwen3_moe.RMSNorm` in
    float32/float64; in bf16 it rounds once instead of twice (normalised value, then scaled), so values can
    differ by one bf16 ulp (the model's order matches HF's; the sampler needs speed, not HF's roundings)."""
    return F.rms_norm(x, (x.shape[-1],), weight=weight, eps=eps)


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
    `rope` is `rope_table(...)` of the compute dtype.

    Written for op count (module docstring): qk-norm + rotary is 3 ops per layer (see below)."""
    cfg = model.config
    B, L = ids_B.shape[0], cfg.num_hidden_layers
    H, G, d, E, K, Fe = (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.num_experts,
                         cfg.num_experts_per_tok, cfg.moe_intermediate_size)
    r, eps, X, EF2, dt = H // G, cfg.rms_norm_eps, (H + G) * d, E * 2 * Fe, cache_k.dtype
    C = cache_k.shape[3]
    S = int(pos_B.max()) + 1
    dev = ids_B.device
    # Additive mask (built once, not converted from bool by every layer's attention) hiding each row's
    # unwritten positions; flat row of each new key in a layer's cache viewed as [slots G C, d].
    mask_B11S = torch.zeros(B, S, dtype=dt, device=dev).masked_fill_(
        torch.arange(S, device=dev)[None, :] > pos_B[:, None], float("-inf"))[:, None, None, :]
    at_BG = ((torch.arange(B, device=dev)[:, None] * G + torch.arange(G, device=dev)) * C + pos_B[:, None]).view(-1)
    ck_Nd, cv_Nd = cache_k.view(L, -1, d).unbind(0), cache_v.view(L, -1, d).unbind(0)   # write views
    ck_BGSd, cv_BGSd = cache_k[:, :B, :, :S].unbind(0), cache_v[:, :B, :, :S].unbind(0)  # attention views
    # qk-norm then rotary: rope(n * w) = n * (w cos) + rotate_half(n) * (swap(w) sin), for n = rms_norm(y)
    # per head, and rotate_half(n) = rms_norm(rotate_half(y)) (a signed permutation keeps the RMS), where
    # rotate_half(y) comes out of the qkv projection (pack_params). The scaled cos/sin of all layers: 2 ops.
    cos_Bd, sin_Bd = rope[0][pos_B], rope[1][pos_B]
    cos_LBXd = (cos_Bd[None, :, None, :] * packed.qk_norm[:, None]).unbind(0)
    sin_LBXd = (sin_Bd[None, :, None, :] * packed.qk_norm_swapped[:, None]).unbind(0)
    zeros_BE = torch.zeros(B, E, dtype=dt, device=dev)
    x_BD = F.embedding(ids_B, packed.embed)
    routes: list[torch.Tensor] = []
    # (views are taken with split/unbind/view: each Python-level indexing op costs a few us too)
    for li, pk in enumerate(packed.layers):
        qkv_BX = F.linear(_norm(x_BD, pk.in_norm, eps), pk.qkv)
        qk2_BX, v_BX = qkv_BX.split((2 * X, G * d), dim=1)
        n_BXd, nrot_BXd = _norm(qk2_BX.view(B, 2, H + G, d), None, eps).unbind(1)
        q_BHd, k_BGd = torch.addcmul(n_BXd * cos_LBXd[li], nrot_BXd, sin_LBXd[li]).split((H, G), dim=1)
        ck_Nd[li].index_copy_(0, at_BG, k_BGd.reshape(B * G, d))
        cv_Nd[li].index_copy_(0, at_BG, v_BX.reshape(B * G, d))
        # Grouped-query attention without repeating k/v: query head h = g*r + j uses kv head g.
        o_BGrd = F.scaled_dot_product_attention(q_BHd.reshape(B, G, r, d), ck_BGSd[li], cv_BGSd[li],
                                                attn_mask=mask_B11S)
        x_BD = x_BD + F.linear(o_BGrd.view(B, H * d), pk.o)
        h_BD = _norm(x_BD, pk.post_norm, eps)
        if pk.moe_in is None:
            x_BD = x_BD + model.model.layers[li].mlp(h_BD)
            continue
        assert pk.down is not None
        gu_BX, logits_BE = F.linear(h_BD, pk.moe_in).split((EF2, E), dim=1)
        if cfg.norm_topk_prob:
            # softmax is monotonic and renormalised top-k probabilities are the softmax of the top-k logits:
            # the same experts and gates as router_probs + topk + replay_gates, in 2 ops instead of 7
            # (top-k in the compute dtype: widening to float32 is exact, so the same experts)
            w_BK, idx_BK = torch.topk(logits_BE, K, dim=-1)
            w_BK = torch.softmax(w_BK, dim=-1, dtype=torch.float64 if dt == torch.float64 else torch.float32)
        else:
            probs_BE = router_probs(logits_BE)
            idx_BK = torch.topk(probs_BE, K, dim=-1).indices
            w_BK = replay_gates(probs_BE, idx_BK, False)
        coef_BE1 = zeros_BE.scatter(1, idx_BK, w_BK.to(dt)).unsqueeze(2)
        gate_BEF, up_BEF = gu_BX.view(B, E, 2, Fe).unbind(2)
        act_BEF = F.silu(gate_BEF).mul_(up_BEF).mul_(coef_BE1)
        x_BD = x_BD + F.linear(act_BEF.view(B, E * Fe), pk.down)
        if record:
            routes.append(idx_BK)
    logits_BV = F.linear(_norm(x_BD, packed.norm, eps), packed.lm_head)
    return logits_BV, (torch.stack(routes, dim=1) if record and routes else None)
