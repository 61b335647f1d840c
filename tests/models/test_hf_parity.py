"""Parity with transformers' Qwen3-MoE: the same random weights, written by our `save_hf` and read by
`from_pretrained` (and the reverse: an HF-saved model read by our `load_hf`), give the same logits and the
same gradients of a loss, in fp32.

    pytest tests/models/test_hf_parity.py -q
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minirl_async.models.config import ModelConfig
from minirl_async.models.hf_io import load_hf, save_hf
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

transformers = pytest.importorskip("transformers")

# Measured max abs differences are ~1e-7 (logits) and ~1e-8 (grads); the tolerance leaves fp32 headroom.
ATOL, RTOL = 2e-5, 1e-4

CONFIGS = {
    # norm_topk_prob off, a dense layer via mlp_only_layers, grouped KV heads, sharded save, rope_theta 1e6
    "no_norm_dense": dict(norm_topk_prob=False, mlp_only_layers=[1], num_hidden_layers=3, rope_theta=1e6,
                          num_key_value_heads=2),
    # renormalised top-k, decoder_sparse_step=2 (layers 1, 3 are MoE), tied embeddings, a pad token
    "sparse_step_tied": dict(norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=4,
                             tie_word_embeddings=True, pad_token_id=0, num_key_value_heads=4),
}


def tiny(**kw: object) -> ModelConfig:
    base: dict[str, object] = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                                   num_attention_heads=4, head_dim=8, num_experts=8, num_experts_per_tok=3)
    base.update(kw)
    return ModelConfig(**base)  # type: ignore[arg-type]


def loss_of(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # cross-entropy plus a term on the full distribution, so every logit's gradient matters
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten()) + 0.1 * logits.square().mean()


def compare(ours: Qwen3MoeForCausalLM, hf: torch.nn.Module, vocab: int, seed: int = 0) -> tuple[float, float]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (2, 11), generator=g)
    ids[1, :3] = 0  # includes the pad token where there is one: its embedding row gets no gradient in both
    targets = torch.randint(0, vocab, (2, 11), generator=g)
    a, b = ours(ids), hf(input_ids=ids).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL)
    loss_of(a, targets).backward()
    loss_of(b, targets).backward()
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    # transformers 5 keeps experts stacked in memory under the same names as ours
    assert set(hf_params) == set(ours_params), set(hf_params) ^ set(ours_params)
    gmax = 0.0
    for name, p in ours_params.items():
        q = hf_params[name]
        assert p.grad is not None and q.grad is not None, name
        torch.testing.assert_close(p.grad, q.grad, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
        gmax = max(gmax, float((p.grad - q.grad).abs().max()))
    return float((a - b).detach().abs().max()), gmax


@pytest.mark.parametrize("name", list(CONFIGS))
def test_ours_saved_loaded_by_transformers(name: str, tmp_path: Path) -> None:
    cfg = tiny(**CONFIGS[name])
    torch.manual_seed(0)
    ours = Qwen3MoeForCausalLM(cfg)
    with torch.no_grad():  # beyond the 0.02 init, so attention, routing and norms are all exercised
        for n, p in ours.named_parameters():
            p.normal_(1.0 if n.endswith("norm.weight") else 0.0, 0.3 if n.endswith("norm.weight") else 0.2)
    save_hf(ours, cfg, tmp_path, max_shard_bytes=30_000 if name == "no_norm_dense" else 2**30)
    if name == "no_norm_dense":
        assert (tmp_path / "model.safetensors.index.json").is_file()
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager",
                                                          dtype=torch.float32)
    assert hf.config.num_experts == cfg.num_experts
    assert hf.config.rope_parameters["rope_theta"] == cfg.rope_theta
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == cfg.tie_word_embeddings
    d_logits, d_grads = compare(ours, hf, cfg.vocab_size)
    print(f"{name}: max |dlogits| {d_logits:.2e}, max |dgrad| {d_grads:.2e}")


def test_transformers_saved_loaded_by_us(tmp_path: Path) -> None:
    cfg = tiny(norm_topk_prob=True, mlp_only_layers=[0], num_hidden_layers=2, rope_theta=5e5, num_key_value_heads=2)
    d = cfg.to_hf_dict()
    for k in ("architectures", "model_type"):
        d.pop(k)
    torch.manual_seed(1)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**d))
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    hf.save_pretrained(tmp_path)
    ours, cfg2 = load_hf(tmp_path)
    assert cfg2.num_experts == cfg.num_experts and cfg2.rope_theta == cfg.rope_theta
    hf = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa", dtype=torch.float32)
    compare(ours, hf, cfg.vocab_size, seed=1)
