"""§7 metrics and chunked log-probs against plain references (fp64)."""

from __future__ import annotations

import math

import pytest
import torch

from minirl_async.algo.logprobs import chunked_logprobs
from minirl_async.algo.metrics import routing_agreement, staleness_kl, train_infer_kl


def test_kl_estimators_match_loops():
    g = torch.Generator().manual_seed(0)
    prox = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 2
    mu = prox + torch.randn(3, 5, generator=g, dtype=torch.float64) * 0.2
    mask = torch.rand(3, 5, generator=g) < 0.6
    mask[0, 0] = True
    pairs = [(p, q) for pr, qr, mr in zip(prox.tolist(), mu.tolist(), mask.tolist())
             for p, q, m in zip(pr, qr, mr) if m]
    k1 = sum(q - p for p, q in pairs) / len(pairs)
    k3 = sum(math.exp(p - q) - 1 - (p - q) for p, q in pairs) / len(pairs)
    out = train_infer_kl(prox, mu, mask)
    assert out["kl/train_infer_k1"] == pytest.approx(k1, abs=1e-14)
    assert out["kl/train_infer_k3"] == pytest.approx(k3, abs=1e-14)
    assert out["kl/train_infer_k3"] > 0
    st = staleness_kl(mu, prox, mask)["kl/staleness_k3"]  # rho = exp(new - prox)
    assert st == pytest.approx(sum(math.exp(q - p) - 1 - (q - p) for p, q in pairs) / len(pairs), abs=1e-14)
    assert train_infer_kl(prox, prox, mask) == {"kl/train_infer_k1": 0.0, "kl/train_infer_k3": 0.0}


def _head_case(g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp64 hidden [2, 5, 6] and LM head [11, 6] needing gradients, and targets [2, 5]."""
    h = torch.randn(2, 5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, generator=g, dtype=torch.float64, requires_grad=True)
    return h, w, torch.randint(0, 11, (2, 5), generator=g)


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy(chunk, temperature):
    g = torch.Generator().manual_seed(1)
    h, w, y = _head_case(g)
    (B, T), (V, D) = y.shape, w.shape
    lp, ent = chunked_logprobs(h, w, y, temperature=temperature, chunk=chunk, with_entropy=True)
    # plain reference, one token at a time
    ref_lp = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            z = [sum(h[b, t, k].item() * w[v, k].item() for k in range(D)) / temperature for v in range(V)]
            m = max(z)
            lz = m + math.log(sum(math.exp(zi - m) for zi in z))
            ref_lp[b, t] = z[int(y[b, t])] - lz
            p = [math.exp(zi - lz) for zi in z]
            assert ent[b, t].item() == pytest.approx(-sum(pi * math.log(pi) for pi in p), abs=1e-12)
    assert torch.allclose(lp.detach(), ref_lp, atol=1e-12)
    # gradient against the unchunked autograd expression
    (lp * torch.arange(B * T, dtype=torch.float64).view(B, T)).sum().backward()
    h2, w2 = h.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = torch.log_softmax(h2 @ w2.T / temperature, -1).gather(-1, y[..., None]).squeeze(-1)
    (ref * torch.arange(B * T, dtype=torch.float64).view(B, T)).sum().backward()
    assert torch.allclose(h.grad, h2.grad, atol=1e-12) and torch.allclose(w.grad, w2.grad, atol=1e-12)


def test_routing_agreement_compares_sets():
    # B=1, T=3, L=2, K=2
    learner = torch.tensor([[[[0, 1], [2, 3]], [[4, 5], [6, 7]], [[1, 2], [0, 3]]]], dtype=torch.uint8)
    sampler = torch.tensor([[[[1, 0], [2, 3]], [[4, 6], [6, 7]], [[0, 0], [3, 0]]]], dtype=torch.uint8)
    valid = torch.tensor([[True, True, False]])
    out = routing_agreement(learner, sampler, valid, layer_ids=[0, 2])
    # token 0: layer 0 same set (order differs), layer 1 same; token 1: layer 0 differs, layer 1 same
    assert out == {"routing/agree_frac": 0.75, "routing/agree_frac_l0": 0.5, "routing/agree_frac_l2": 1.0}
    with pytest.raises(ValueError, match="differ in shape"):
        routing_agreement(learner, sampler[:, :2], valid)


def test_bf16_head_is_computed_in_fp32():
    # bf16 model: the log-probs are those of the fp32 product of the SAME bf16 hidden and weight (no bf16
    # rounding of the logits on the learner side), and the gradients come back in bf16
    from minirl_async.models.config import ModelConfig
    from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(ModelConfig(
        vocab_size=64, hidden_size=32, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=4, num_experts_per_tok=2,
        initializer_range=0.5)).to(torch.bfloat16)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(2))
    h = model.forward_hidden(ids).detach().requires_grad_(True)
    w = model.lm_head.weight
    lp, ent = chunked_logprobs(h, w, y, temperature=0.7, chunk=4, with_entropy=True)
    assert lp.dtype == torch.float32 and ent is not None
    # reference in fp64 on the same bf16 operands (exact in fp64): fp32 accuracy of log-probs near -10
    ref = torch.log_softmax(h.detach().double() @ w.detach().double().T / 0.7, -1).gather(-1, y[..., None])[..., 0]
    assert float((lp.detach().double() - ref).abs().max()) < 2e-5
    bf16_logits = torch.log_softmax((h.detach() @ w.detach().T).float() / 0.7, -1).gather(-1, y[..., None])[..., 0]
    assert float((bf16_logits - ref).abs().max()) > 1e-3   # the rounding the fp32 head avoids
    lp.sum().backward()
    assert h.grad is not None and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("chunk", [1, 4, 100])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_fn_gradients(chunk, temperature):
    # the written-out backward of the log-prob path (no entropy): gradcheck in fp64 and the same values and
    # gradients as the unchunked autograd expression; fp32 log-probs bit-identical to the entropy path
    from minirl_async.algo.logprobs import _LogprobFn

    g = torch.Generator().manual_seed(3)
    h, w, y = _head_case(g)
    (B, T), D = y.shape, h.shape[-1]
    assert torch.autograd.gradcheck(lambda h, w: _LogprobFn.apply(h, w, y.view(-1), 1 / temperature, chunk, (B, T)),
                                    (h.view(B * T, D), w))
    lp, ent = chunked_logprobs(h, w, y, temperature=temperature, chunk=chunk)
    assert ent is None
    cot = torch.randn(B, T, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((lp * cot).sum(), (h, w))
    ref_lp = torch.log_softmax(h @ w.T / temperature, -1).gather(-1, y[..., None]).squeeze(-1)
    ref = torch.autograd.grad((ref_lp * cot).sum(), (h, w))
    torch.testing.assert_close(lp, ref_lp, rtol=1e-12, atol=1e-12)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    h32, w32 = h.detach().float().requires_grad_(True), w.detach().float().requires_grad_(True)
    lp32, _ = chunked_logprobs(h32, w32, y, temperature=temperature, chunk=chunk)
    with torch.no_grad():
        lp32_ent, _ = chunked_logprobs(h32, w32, y, temperature=temperature, chunk=chunk, with_entropy=True)
    assert torch.equal(lp32.detach(), lp32_ent)
    # only the weight needs a gradient (hidden from a frozen trunk)
    lp_w, _ = chunked_logprobs(h.detach(), w, y, temperature=temperature, chunk=chunk)
    torch.testing.assert_close(torch.autograd.grad((lp_w * cot).sum(), w)[0], ref[1], rtol=1e-12, atol=1e-12)


def test_logprob_fn_bf16():
    # bf16 hidden and weight: fp32 log-probs, bf16 gradients close to the checkpointed autograd path's
    g = torch.Generator().manual_seed(4)
    h = torch.randn(3, 5, 16, generator=g).bfloat16().requires_grad_(True)
    w = torch.randn(40, 16, generator=g).bfloat16().requires_grad_(True)
    y = torch.randint(0, 40, (3, 5), generator=g)
    lp, _ = chunked_logprobs(h, w, y, temperature=0.7, chunk=4)
    lp_ref, _ = chunked_logprobs(h, w, y, temperature=0.7, chunk=4, with_entropy=True)
    assert lp.dtype == torch.float32 and torch.equal(lp.detach(), lp_ref.detach())
    got = torch.autograd.grad(lp.sum(), (h, w))
    ref = torch.autograd.grad(lp_ref.sum(), (h, w))
    for a, b in zip(got, ref):
        assert a.dtype == torch.bfloat16
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
