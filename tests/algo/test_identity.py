"""ALGORITHM.md §2: at theta == theta_old and mu == pi, the gradient of the MiniRL surrogate equals the
gradient of the sequence-level REINFORCE objective (1/n) sum_i A_i log pi_theta(y_i), exactly (fp64, tiny
MoE model); the length-normalised variant does not.

The MiniRL side runs the learner's real path (padded batch, chunked log-probs); the reference computes
log pi(y_i) one unpadded sequence at a time with the plain model and a full log-softmax."""

from __future__ import annotations

import torch

from minirl_async.algo.advantages import group_advantages
from minirl_async.algo.losses import LossConfig, compute_policy_loss
from minirl_async.learner.batch import collate
from minirl_async.learner.trainer import PolicyLogprobs
from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

CFG = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
           num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
           initializer_range=0.2)


def _setup():
    from minirl_async.learner.batch import Sample

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(ModelConfig(**CFG)).double()
    g = torch.Generator().manual_seed(1)
    rewards = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]], dtype=torch.float64)
    A = group_advantages(rewards, normalize_std=False).reshape(-1)
    samples = []
    for gi in range(2):
        prompt = torch.randint(0, 32, (3 + gi,), generator=g)
        for _ in range(3):
            resp = torch.randint(0, 32, (int(torch.randint(1, 7, (1,), generator=g)),), generator=g)
            samples.append(Sample(prompt, resp, torch.zeros(len(resp)), 0.0))
    return model, samples, A


def _grads(model, loss):
    model.zero_grad()
    loss.backward()
    return torch.cat([p.grad.reshape(-1) for p in model.parameters() if p.grad is not None])


def _reinforce_grad(model, samples, A):
    total = 0.0
    for s, a in zip(samples, A.tolist()):
        seq = torch.cat([s.prompt_ids, s.response_ids])
        logp = torch.log_softmax(model(seq[None, :-1])[0], -1)
        P = len(s.prompt_ids)
        total = total + a * logp[P - 1:].gather(-1, s.response_ids[:, None]).sum()
    return _grads(model, -total / len(samples))


def _surrogate_grad(model, samples, A, name):
    b = collate(samples, A.tolist())
    lp, _ = PolicyLogprobs(model)(b.input_ids_BT, b.targets_BT, None, 1.0, 5, False)
    lp_sg = lp.detach()     # theta == theta_old (prox) and mu == pi (rollout)
    loss, m = compute_policy_loss(lp, lp_sg, lp_sg, b.advantages_B, b.response_mask_BT, LossConfig(name=name))
    assert m["loss/clip_frac"] == 0.0 and m["is/d_max"] == 1.0
    return _grads(model, loss)


def test_minirl_gradient_equals_sequence_reinforce():
    model, samples, A = _setup()
    ref = _reinforce_grad(model, samples, A)
    got = _surrogate_grad(model, samples, A, "minirl")
    err = float((got - ref).abs().max())
    print(f"§2 identity: max |grad_minirl - grad_reinforce| = {err:.3e} (grad scale {float(ref.abs().max()):.3e})")
    assert float(ref.abs().max()) > 1e-2
    assert err < 1e-10


def test_lennorm_breaks_the_identity():
    model, samples, A = _setup()
    ref = _reinforce_grad(model, samples, A)
    got = _surrogate_grad(model, samples, A, "minirl_lennorm")
    assert float((got - ref).abs().max()) > 1e-3
