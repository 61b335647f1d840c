"""Model numerics in fp64 against plain references: grouped experts vs a per-token loop, routing
RECORD/REPLAY, replay gating, the kv_cache and attn_mask hooks, and ModelConfig conversions.

    pytest tests/models/test_qwen3_moe.py -q
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minirl_async.config import ModelArch
from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM, SparseMoeBlock, grouped_experts
from minirl_async.models.routing import Routing, batch_routes, routes_dtype

# B batch, T tokens, D hidden, E experts, K top-k, F expert width, N tokens (flattened), L MoE layers


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=40, hidden_size=24, intermediate_size=40, moe_intermediate_size=12,
                                   num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                   num_experts=6, num_experts_per_tok=2, mlp_only_layers=[1], rope_theta=1e4)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def model64(cfg: ModelConfig, seed: int = 0) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    m = Qwen3MoeForCausalLM(cfg).double()
    with torch.no_grad():  # larger weights than the 0.02 init so routing and attention are far from uniform
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, 0.3)
    return m


def reference_experts(x_ND, idx_NK, w_NK, gate_up_EFD, down_EDF):
    """sum_k w[n,k] * SwiGLU_{idx[n,k]}(x[n]), one token and one k at a time."""
    Fe = down_EDF.shape[2]
    rows = []
    for n in range(x_ND.shape[0]):
        acc = torch.zeros_like(x_ND[n])
        for k in range(idx_NK.shape[1]):
            e = int(idx_NK[n, k])
            g = gate_up_EFD[e, :Fe] @ x_ND[n]
            u = gate_up_EFD[e, Fe:] @ x_ND[n]
            acc = acc + w_NK[n, k] * (down_EDF[e] @ (F.silu(g) * u))
        rows.append(acc)
    return torch.stack(rows)


def test_grouped_experts_equal_per_token_loop_fp64() -> None:
    torch.manual_seed(0)
    N, D, E, K, Fe = 11, 6, 5, 2, 4
    x = torch.randn(N, D, dtype=torch.float64, requires_grad=True)
    gu = torch.randn(E, 2 * Fe, D, dtype=torch.float64, requires_grad=True)
    dn = torch.randn(E, D, Fe, dtype=torch.float64, requires_grad=True)
    idx = torch.stack([torch.randperm(E - 1)[:K] for _ in range(N)])  # expert E-1 never used: empty slice
    w = torch.rand(N, K, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(N, D, dtype=torch.float64)
    got = grouped_experts(x, idx, w, gu, dn)
    ref = reference_experts(x, idx, w, gu, dn)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * cot).sum(), (x, gu, dn, w))
    g_ref = torch.autograd.grad((ref * cot).sum(), (x, gu, dn, w))
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert g_got[1][E - 1].abs().max() == 0  # the unused expert gets no gradient


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_replay_gating_matches_plain_reference_fp64(norm_topk_prob: bool) -> None:
    cfg = tiny(norm_topk_prob=norm_topk_prob)
    torch.manual_seed(1)
    blk = SparseMoeBlock(cfg).double()
    with torch.no_grad():
        for p in blk.parameters():
            p.normal_(0, 0.5)
    B, T, K, E = 2, 5, cfg.num_experts_per_tok, cfg.num_experts
    x = torch.randn(B, T, cfg.hidden_size, dtype=torch.float64, requires_grad=True)
    idx_BTK = torch.stack([torch.randperm(E)[:K] for _ in range(B * T)]).view(B, T, K)
    y, used = blk(x, idx_BTK)
    assert torch.equal(used, idx_BTK)
    # Reference: softmax over all experts -> gather at the given indices -> renormalise -> weighted experts.
    x_ND, idx_NK = x.reshape(B * T, -1), idx_BTK.reshape(B * T, K)
    p = torch.softmax(x_ND @ blk.gate.weight.T, dim=-1)
    w = torch.stack([p[n, idx_NK[n]] for n in range(B * T)])
    if norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    ref = reference_experts(x_ND, idx_NK, w, blk.experts.gate_up_proj, blk.experts.down_proj).view(B, T, -1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    cot = torch.randn_like(y)
    params = (x, blk.gate.weight, blk.experts.gate_up_proj, blk.experts.down_proj)
    for a, b in zip(torch.autograd.grad((y * cot).sum(), params), torch.autograd.grad((ref * cot).sum(), params)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)


def test_record_then_replay_is_bit_identical() -> None:
    cfg = tiny(num_hidden_layers=4, decoder_sparse_step=1, mlp_only_layers=[2])
    m = model64(cfg).float()
    ids = torch.randint(0, cfg.vocab_size, (3, 9))
    rec = Routing("record")
    free = m(ids, routing=rec)
    assert rec.recorded_BTLK is not None
    assert rec.recorded_BTLK.shape == (3, 9, len(cfg.moe_layer_ids), cfg.num_experts_per_tok) == (3, 9, 3, 2)
    assert rec.recorded_BTLK.dtype == torch.uint8
    # top-k sets are distinct experts, ordered by decreasing probability as HF/SGLang report them
    assert (rec.recorded_BTLK[..., 0] != rec.recorded_BTLK[..., 1]).all()
    replayed = m(ids, routing=Routing("replay", replay_BTLK=rec.recorded_BTLK))
    assert torch.equal(free, replayed)
    g_free = torch.autograd.grad(free.square().mean(), list(m.parameters()))
    g_rep = torch.autograd.grad(m(ids, routing=Routing("replay", replay_BTLK=rec.recorded_BTLK)).square().mean(),
                                list(m.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(g_free, g_rep))
    assert torch.equal(m(ids), free)  # routing=None is free routing


def test_replay_other_indices_changes_output_and_trains_router() -> None:
    cfg = tiny()
    m = model64(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 7))
    rec = Routing("record")
    free = m(ids, routing=rec)
    assert rec.recorded_BTLK is not None
    other = (rec.recorded_BTLK.long() + 1) % cfg.num_experts  # a different, still-distinct top-k everywhere
    out = m(ids, routing=Routing("replay", replay_BTLK=other.to(torch.uint8)))
    assert (out - free).abs().max() > 1e-3
    out.logsumexp(-1).mean().backward()
    for i in cfg.moe_layer_ids:
        g = m.model.layers[i].mlp.gate.weight.grad
        assert g is not None and torch.isfinite(g).all() and g.abs().max() > 0, f"layer {i}"


def test_replay_validation_messages() -> None:
    cfg = tiny()
    m = model64(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 5))
    with pytest.raises(ValueError, match=r"replay_BTLK has shape \(2, 5, 1, 2\), expected \(2, 5, 2, 2\)"):
        m(ids, routing=Routing("replay", replay_BTLK=torch.zeros(2, 5, 1, 2, dtype=torch.uint8)))
    with pytest.raises(ValueError, match=r"expert ids outside \[0, 6\)"):
        m(ids, routing=Routing("replay", replay_BTLK=torch.full((2, 5, 2, 2), 6, dtype=torch.uint8)))
    with pytest.raises(ValueError, match="needs replay_BTLK"):
        Routing("replay")
    with pytest.raises(ValueError, match="use mode='replay'"):
        Routing("record", replay_BTLK=torch.zeros(1, 1, 1, 1))
    with pytest.raises(ValueError, match="routing mode must be"):
        Routing("R3")  # type: ignore[arg-type]


def test_batch_routes_replay_on_padded_batch() -> None:
    """Per-sequence routes in the sampler layout [P+R-1, L, K], right-padded into one replay batch, reproduce
    each sequence's free forward on its valid positions (causal attention ignores the right padding)."""
    cfg = tiny()
    m = model64(cfg)
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in (8, 5)]
    routes, frees = [], []
    for s in seqs:
        rec = Routing("record")
        frees.append(m(s[None, :-1], routing=rec)[0])  # the last token is never fed: P+R-1 positions
        assert rec.recorded_BTLK is not None
        routes.append(rec.recorded_BTLK[0])
    T = 7
    ids = torch.zeros(2, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s) - 1] = s[:-1]
    replay = batch_routes(routes, T)
    assert replay.shape == (2, T, 2, 2) and replay.dtype == torch.uint8
    assert torch.equal(replay[1, 4:], torch.tensor([0, 1], dtype=torch.uint8).expand(3, 2, 2))
    out = m(ids, routing=Routing("replay", replay_BTLK=replay))
    for i, f in enumerate(frees):
        torch.testing.assert_close(out[i, : f.shape[0]], f, rtol=1e-12, atol=1e-12)
    left = batch_routes(routes, T, offsets=[0, 3])
    assert torch.equal(left[1, 3:], routes[1])
    with pytest.raises(ValueError, match=r"routes\[0\] \(7 tokens at offset 1\) does not fit in T=7"):
        batch_routes(routes, T, offsets=[1, 0])
    with pytest.raises(ValueError, match=r"routes\[1\] has shape \(4, 3, 2\), expected \[tokens, 2, 2\]"):
        batch_routes([routes[0], torch.zeros(4, 3, 2, dtype=torch.uint8)], T)


def test_routes_dtype() -> None:
    assert routes_dtype(8) == routes_dtype(256) == torch.uint8
    assert routes_dtype(257) == torch.int16 and routes_dtype(40000) == torch.int32


class ListCache:
    """The smallest object satisfying the kv_cache hook: per-layer growing lists."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer_idx: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor):
        if layer_idx in self.k:
            k_BHTd = torch.cat([self.k[layer_idx], k_BHTd], dim=2)
            v_BHTd = torch.cat([self.v[layer_idx], v_BHTd], dim=2)
        self.k[layer_idx], self.v[layer_idx] = k_BHTd, v_BHTd
        return k_BHTd, v_BHTd


def test_kv_cache_incremental_decode_equals_full_forward() -> None:
    cfg = tiny(num_key_value_heads=1)
    m = model64(cfg)
    B, T, P = 2, 10, 4
    ids = torch.randint(0, cfg.vocab_size, (B, T))
    rec = Routing("record")
    full = m(ids, routing=rec)
    cache, logits, routes = ListCache(), [], []
    # prefill of P tokens, then a 2-token chunk (causal inside the chunk, aligned to the cache end), then 1s
    steps = [(0, P), (P, P + 2)] + [(t, t + 1) for t in range(P + 2, T)]
    for a, b in steps:
        r = Routing("record")
        logits.append(m(ids[:, a:b], torch.arange(a, b).expand(B, b - a), routing=r, kv_cache=cache))
        routes.append(r.recorded_BTLK)
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-12, atol=1e-12)
    assert torch.equal(torch.cat(routes, 1), rec.recorded_BTLK)
    with pytest.raises(ValueError, match="position_ids_BT is required"):
        m(ids[:, :1], kv_cache=ListCache())


def test_attn_mask_left_padding_equals_unpadded_rows() -> None:
    """Engines batch prompts of different lengths with left padding, a bool mask and explicit positions."""
    cfg = tiny()
    m = model64(cfg)
    lens, T = [7, 4], 7
    seqs = [torch.randint(0, cfg.vocab_size, (n,)) for n in lens]
    ids = torch.zeros(2, T, dtype=torch.long)
    pos = torch.zeros(2, T, dtype=torch.long)
    valid = torch.zeros(2, T, dtype=torch.bool)
    for b, s in enumerate(seqs):
        ids[b, T - len(s):] = s
        pos[b, T - len(s):] = torch.arange(len(s))
        valid[b, T - len(s):] = True
    causal = torch.tril(torch.ones(T, T, dtype=torch.bool))
    mask = causal[None, None] & valid[:, None, None, :]
    mask |= torch.eye(T, dtype=torch.bool)[None, None]  # pad rows attend to themselves: no all-False row
    out = m(ids, pos, attn_mask=mask)
    for b, s in enumerate(seqs):
        torch.testing.assert_close(out[b, T - len(s):], m(s[None])[0], rtol=1e-12, atol=1e-12)
    additive = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(m(ids, pos, attn_mask=additive), out, rtol=1e-12, atol=1e-12)


def test_forward_hidden_and_bf16() -> None:
    cfg = tiny(tie_word_embeddings=True)
    m = model64(cfg).float()
    assert m.lm_head.weight is m.model.embed_tokens.weight
    ids = torch.randint(0, cfg.vocab_size, (2, 6))
    h = m.forward_hidden(ids)
    torch.testing.assert_close(m.lm_head(h), m(ids))
    rec = Routing("record")
    ref = m(ids, routing=rec)
    # bf16 keeps ~3 significant digits, and may flip a near-tie top-k choice: replay the fp32 routes so the
    # comparison measures rounding only (this is exactly what R3 does for the FP8 sampler's routes).
    out = m.to(torch.bfloat16)(ids, routing=Routing("replay", replay_BTLK=rec.recorded_BTLK))
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.03 * ref.abs().max()


def test_model_config_layout_and_conversions() -> None:
    cfg = tiny(num_hidden_layers=6, decoder_sparse_step=2, mlp_only_layers=[3])
    assert cfg.moe_layer_ids == [1, 5]
    assert ModelConfig.from_hf_dict(cfg.to_hf_dict()) == cfg
    arch = ModelArch(num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0])
    c = ModelConfig.from_arch(arch, vocab_size=99, eos_token_id=3)
    assert (c.vocab_size, c.num_experts, c.mlp_only_layers, c.eos_token_id) == (99, 4, [0], 3)
    with pytest.raises(ValueError, match="vocab_size must be >= 1"):
        ModelConfig.from_arch(arch, vocab_size=0)
    with pytest.raises(ValueError, match="num_key_value_heads=3 must divide num_attention_heads=4"):
        tiny(num_key_value_heads=3)
    with pytest.raises(ValueError, match="num_experts_per_tok=7 must be <= num_experts=6"):
        tiny(num_experts_per_tok=7)
    with pytest.raises(ValueError, match="model_type is 'llama'"):
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "model_type": "llama"})
    with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="rope type 'linear' is not supported"):   # the older "type" spelling
        ModelConfig.from_hf_dict({**cfg.to_hf_dict(), "rope_scaling": {"type": "linear", "factor": 2.0}})
