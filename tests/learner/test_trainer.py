"""Trainer: R2/R3 semantics, learning on a toy reward, bad input, non-finite updates, lr schedule (fp64)."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from learner_util import make_groups, run_config, tiny_model

import minirl_async.learner.trainer as trainer_mod
from minirl_async.learner import BatchError, Group, Sample, Trainer
from minirl_async.learner.trainer import lr_lambda
from minirl_async.models.routing import Routing


def _weights(tr: Trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in tr.model.parameters()])


def _one_step(model, groups, mode, *overrides):
    tr = Trainer(run_config(*overrides), copy.deepcopy(model))
    m = tr.train_step(groups, mode)
    return tr, m


def test_on_policy_metrics(model):
    groups = make_groups(model)
    _, m = _one_step(model, groups, "none")
    assert abs(m["kl/train_infer_k1"]) < 1e-6 and m["kl/train_infer_k3"] < 1e-10   # rollout lp are float32
    assert m["routing/agree_frac"] == 1.0 and m["routing/agree_frac_l0"] == m["routing/agree_frac_l1"] == 1.0
    assert m["loss/clip_frac"] == 0.0 and m["is/trunc_frac"] == 0.0
    assert m["kl/staleness_k3"] > 0 and m["policy/entropy"] > 0 and m["train/num_updates"] == 2


def test_r2_first_update_equals_no_replay(model):
    groups = make_groups(model, seed=3)
    # R3 with routes recorded at theta_old (make_groups' own) is what R2 must do on every minibatch
    w_ref = _weights(_one_step(model, copy.deepcopy(groups), "r3")[0])
    E = model.config.num_experts
    for g in groups:   # sampler routes that differ from the learner's: R2 must not use them
        for s in g.samples:
            assert s.routes is not None
            s.routes = ((s.routes.long() + 1) % E).to(s.routes.dtype)
    one_mb = ("learner.minibatch_groups=2",)   # N = 1: the step is exactly the first minibatch update
    w_none = _weights(_one_step(model, groups, "none", *one_mb)[0])
    w_r2 = _weights(_one_step(model, groups, "r2", *one_mb)[0])
    assert not torch.equal(w_none, _weights(Trainer(run_config(), copy.deepcopy(model))))
    assert torch.equal(w_none, w_r2)
    # with N = 2 the second update replays the proximal routes, so the step differs from free routing
    w_none2 = _weights(_one_step(model, groups, "none")[0])
    w_r2b = _weights(_one_step(model, groups, "r2")[0])
    assert not torch.allclose(w_none2, w_r2b, atol=1e-12)
    # ... namely the routes recorded at theta_old, not the sampler's (to rounding: padding rows, see
    # test_r3_replays_sampler_routes, ~1e-12 after two AdamW updates; wrong routes move weights by ~1e-3)
    torch.testing.assert_close(w_r2b, w_ref, rtol=0, atol=1e-10)
    assert float((_weights(_one_step(model, groups, "r3")[0]) - w_ref).abs().max()) > 1e-5


def test_r3_replays_sampler_routes(model):
    groups = make_groups(model, seed=4)
    one_mb = ("learner.minibatch_groups=2",)
    # sampler routes == learner routes on every real token: R3 is R2. Equal to rounding, not bit for bit:
    # padding rows replay filler experts in R3 but their freely chosen ones in R2, which changes the row
    # counts of the grouped expert matmuls and so the blocking of the other rows' sums (~1e-16 in fp64).
    w_r2 = _weights(_one_step(model, groups, "r2", *one_mb)[0])
    torch.testing.assert_close(_weights(_one_step(model, groups, "r3", *one_mb)[0]), w_r2, rtol=0, atol=1e-13)
    # different sampler routes: R3 differs from the first minibatch on
    E = model.config.num_experts
    for g in groups:
        for s in g.samples:
            assert s.routes is not None
            s.routes = ((s.routes.long() + 1) % E).to(s.routes.dtype)
    tr, m = _one_step(model, groups, "r3", *one_mb)
    assert not torch.allclose(_weights(tr), w_r2, atol=1e-9)
    assert m["routing/agree_frac"] < 0.5   # agreement is measured with free routing, not the replayed one
    # the proximal pass replays the perturbed routes: pi_prox is the replayed forward's, far from mu
    # (a proximal pass routing freely would give pi_prox == mu, k3 ~ 0)
    want = _replayed_train_infer_k3(model, groups)
    assert want > 1e-3
    assert m["kl/train_infer_k3"] == pytest.approx(want, rel=1e-9)


def _replayed_train_infer_k3(model, groups) -> float:
    """Reference kl/train_infer_k3: one unpadded sequence at a time, plain forward replaying s.routes."""
    total, n = 0.0, 0
    for g in groups:
        for s in g.samples:
            seq = torch.cat([s.prompt_ids, s.response_ids])
            with torch.no_grad():
                logits = model(seq[None, :-1], routing=Routing("replay", replay_BTLK=s.routes[None]))[0]
            P = len(s.prompt_ids)
            lp = torch.log_softmax(logits, -1)[P - 1:].gather(-1, s.response_ids[:, None]).squeeze(-1)
            log_rho = lp - s.rollout_logprobs.double()
            total += float((log_rho.exp() - 1 - log_rho).sum())
            n += len(s.response_ids)
    return total / n


def test_learning_increases_sequence_objective(model):
    # fixed toy batch: reward 1 for responses containing token 7; a few steps must raise sum A_i log pi(y_i)
    groups = make_groups(model, num_groups=2, G=4, seed=5)
    for g in groups:
        for j, s in enumerate(g.samples):
            if j % 2 == 0:
                s.response_ids[0] = 7
        for s in g.samples:
            s.reward = float((s.response_ids == 7).any())

    def objective(m):
        total = 0.0
        for g in groups:
            mean = sum(s.reward for s in g.samples) / len(g.samples)
            for s in g.samples:
                seq = torch.cat([s.prompt_ids, s.response_ids])
                with torch.no_grad():
                    lp = torch.log_softmax(m(seq[None, :-1])[0], -1)
                P = len(s.prompt_ids)
                total += (s.reward - mean) * float(lp[P - 1:].gather(-1, s.response_ids[:, None]).sum())
        return total

    tr = Trainer(run_config("learner.lr=0.003"), copy.deepcopy(model))
    before = objective(tr.model)
    for _ in range(4):
        tr.train_step(groups, "r2")
    # the sequence-level REINFORCE loss -sum A_i log pi(y_i) falls (the surrogate's own value is not
    # comparable across steps: its weights d * r change as the policy moves away from the fixed mu)
    assert objective(tr.model) > before + 0.5


def _sample(P=3, R=2, E=4):
    return Sample(prompt_ids=torch.arange(P), response_ids=torch.arange(R), rollout_logprobs=torch.zeros(R),
                  reward=1.0, versions=torch.zeros(R, dtype=torch.long),
                  routes=torch.zeros(P + R - 1, 2, 2, dtype=torch.uint8) + torch.tensor([0, 1], dtype=torch.uint8))


@pytest.mark.parametrize("breakage, message", [
    (lambda s: setattr(s, "rollout_logprobs", torch.tensor([0.0, float("nan")])), "NaN or inf"),
    (lambda s: setattr(s, "rollout_logprobs", torch.tensor([0.0, -float("inf")])), "NaN or inf"),
    (lambda s: setattr(s, "reward", float("inf")), "reward is inf"),
    (lambda s: setattr(s, "reward", float("nan")), "reward is nan"),
    (lambda s: (setattr(s, "response_ids", torch.zeros(0, dtype=torch.long)),
                setattr(s, "rollout_logprobs", torch.zeros(0))), "empty response"),
    (lambda s: setattr(s, "routes", torch.zeros(5, 2, 2, dtype=torch.uint8)), "routes have shape"),
    (lambda s: setattr(s, "routes", torch.full((4, 2, 2), 4, dtype=torch.uint8)), "expert ids outside"),
    (lambda s: setattr(s, "response_ids", torch.tensor([0, 99])), "outside"),
])
def test_bad_input_rejected_and_weights_unchanged(model, breakage, message):
    tr = Trainer(run_config(), copy.deepcopy(model))
    w0 = _weights(tr)
    good = Group("good", [_sample(), _sample()])
    bad = Group("bad-7", [_sample(), _sample()])
    breakage(bad.samples[1])
    with pytest.raises(BatchError, match=message) as e:
        tr.train_step([good, bad], "none")
    assert "bad-7" in str(e.value) and "sample 1" in str(e.value)
    assert list(tr.invalid_groups([good, bad])) == ["bad-7"]
    assert torch.equal(_weights(tr), w0) and tr.version == 0


def test_group_of_one_and_wrong_sizes_rejected(model):
    tr = Trainer(run_config(), copy.deepcopy(model))
    with pytest.raises(BatchError, match="'lonely'.*at least 2"):
        tr.train_step([Group("a", [_sample(), _sample()]), Group("lonely", [_sample()])], "none")
    with pytest.raises(ValueError, match="multiple of learner.minibatch_groups"):
        Trainer(run_config("learner.minibatch_groups=2"), copy.deepcopy(model)).train_step(
            [Group("a", [_sample(), _sample()])], "none")
    with pytest.raises(ValueError, match="replay_mode"):
        tr.train_step([Group("a", [_sample(), _sample()])] * 2, "r5")
    no_routes = [Group(f"n{i}", [_sample(), _sample()]) for i in range(2)]
    for g in no_routes:
        for s in g.samples:
            s.routes = None
    with pytest.raises(ValueError, match="r3.*routes"):
        tr.train_step(no_routes, "r3")
    tr.train_step(no_routes, "r2")   # routes are optional outside r3 (no routing metrics then)


def test_non_finite_update_is_skipped(model, monkeypatch):
    tr = Trainer(run_config(), copy.deepcopy(model))
    w0 = _weights(tr)
    real = trainer_mod.compute_policy_loss

    def poisoned(*a, **k):
        loss, m = real(*a, **k)
        return loss * float("nan"), {**m, "loss/policy": float("nan")}

    monkeypatch.setattr(trainer_mod, "compute_policy_loss", poisoned)
    m = tr.train_step(make_groups(model), "none")
    assert m["train/skipped_updates"] == 2.0 and tr.skipped_updates == 2
    assert torch.equal(_weights(tr), w0)
    assert not tr.optimizer.state   # AdamW never stepped: no moments polluted
    assert all(p.grad is None for p in tr.model.parameters())
    monkeypatch.setattr(trainer_mod, "compute_policy_loss", real)
    m = tr.train_step(make_groups(model), "none")
    assert m["train/skipped_updates"] == 0.0 and not torch.equal(_weights(tr), w0)


def test_non_finite_gradient_with_finite_loss_is_skipped(model):
    tr = Trainer(run_config(), copy.deepcopy(model))
    w0 = _weights(tr)
    p = next(tr.model.parameters())
    hook = p.register_hook(lambda g: g * float("inf"))   # the loss stays finite, one gradient does not
    m = tr.train_step(make_groups(model), "none")
    assert math.isfinite(m["loss/policy"]) and m["train/skipped_updates"] == 2.0
    assert torch.equal(_weights(tr), w0) and not tr.optimizer.state
    hook.remove()
    assert tr.train_step(make_groups(model), "none")["train/skipped_updates"] == 0.0


@pytest.mark.parametrize("clip", [1e-3, 100.0])
def test_gradient_clipped_to_the_global_norm(model, clip):
    # AdamW's first step moves every weight by ~lr whatever the gradient's scale, so read the gradient it
    # was given from its state: exp_avg = (1 - beta1) * g after one step.
    tr = Trainer(run_config("learner.minibatch_groups=2", f"learner.grad_clip={clip}"), copy.deepcopy(model))
    m = tr.train_step(make_groups(model), "none")
    beta1 = tr.optimizer.param_groups[0]["betas"][0]
    applied = torch.cat([(st["exp_avg"] / (1 - beta1)).reshape(-1) for st in tr.optimizer.state.values()])
    pre = m["loss/grad_norm"]   # before clipping (one update)
    assert pre > 1e-2
    assert float(applied.norm()) == pytest.approx(min(pre, clip), rel=1e-6)


def test_lr_schedule():
    f = lr_lambda(warmup=3, total=13, schedule="cosine")
    assert [f(u) for u in range(3)] == pytest.approx([0.25, 0.5, 0.75])
    assert f(3) == pytest.approx(1.0) and f(8) == pytest.approx(0.5) and f(13) == pytest.approx(0.0)
    assert f(20) == pytest.approx(0.0)
    g = lr_lambda(warmup=0, total=10, schedule="constant")
    assert g(0) == g(9) == 1.0
    assert math.isclose(lr_lambda(2, 10, "constant")(5), 1.0)


def test_micro_batches_equal_one_batch(model):
    # gradient accumulation over micro-batches (global normalisers) equals the whole minibatch at once
    groups = make_groups(model, num_groups=2, G=3, seed=8)
    for loss in ("minirl", "minirl_lennorm", "cispo", "grpo"):
        whole, mw = _one_step(model, groups, "r2", f"algo.loss={loss}")
        micro, mm = _one_step(model, groups, "r2", f"algo.loss={loss}", "learner.micro_batch_size=2")
        # 1e-10, not 1e-12: the first AdamW update is lr * g / (|g| + eps), whose slope lr / eps = 1e6 for
        # gradient entries far below eps turns their ~1e-18 summation-order rounding into ~1e-12 weights
        assert torch.allclose(_weights(whole), _weights(micro), atol=1e-10, rtol=0), loss
        for key in ("loss/policy", "loss/grad_norm", "kl/staleness_k3", "policy/entropy", "routing/agree_frac"):
            assert mw[key] == pytest.approx(mm[key], rel=1e-10, abs=1e-13), (loss, key)


@pytest.mark.parametrize("loss, invariant", [("grpo", True), ("cispo", True), ("minirl", False)])
def test_std_normalised_advantages(model, loss, invariant):
    # grpo/cispo divide each group's advantages by its reward std, so scaling ONE group's rewards by 10
    # leaves the step unchanged (up to the std epsilon); minirl's A = R - mean scales that group's
    # share of the gradient by 10, which moves the AdamW step (scaling ALL rewards would not: the first
    # AdamW update is nearly invariant to the gradient's scale)
    rewards = [[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]]
    one_mb = ("learner.minibatch_groups=2", f"algo.loss={loss}")
    base = _weights(_one_step(model, make_groups(model, seed=9, rewards=rewards), "r2", *one_mb)[0])
    scaled = [[10 * r for r in rewards[0]], rewards[1]]
    w = _weights(_one_step(model, make_groups(model, seed=9, rewards=scaled), "r2", *one_mb)[0])
    w0 = _weights(Trainer(run_config(), copy.deepcopy(model)))
    assert float((base - w0).abs().max()) > 1e-3   # the step moved the weights
    diff = float((w - base).abs().max())
    if invariant:
        assert diff < 1e-4, diff   # 1e-5 is the std epsilon (some gradient entries nearly cancel)
    else:
        assert diff > 1e-3, diff


def _response_logprobs(model, s) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the response tokens and the full-vocabulary entropy at their positions (one unpadded
    sequence, free routing)."""
    seq = torch.cat([s.prompt_ids, s.response_ids])
    with torch.no_grad():
        logp_TV = torch.log_softmax(model(seq[None, :-1])[0], -1)[len(s.prompt_ids) - 1:]
    return logp_TV.gather(-1, s.response_ids[:, None])[:, 0], -(logp_TV.exp() * logp_TV).sum(-1)


def test_step_metrics_match_plain_references(model):
    # N = 2 updates without replay, mu != pi_prox, an lr large enough that the second update clips: every
    # trainer-owned figure against its definition (ALGORITHM.md section 7), computed one sequence at a time
    groups = make_groups(model, num_groups=2, G=4, seed=11)
    g = torch.Generator().manual_seed(12)
    for grp in groups:
        for s in grp.samples:
            noise = 0.8 * torch.randn(len(s.response_ids), generator=g, dtype=torch.float64)
            noise[0] -= 2.0   # mu far below pi_prox on the first token: d ~ e^2 > is_cap sometimes
            s.rollout_logprobs = (s.rollout_logprobs.double() + noise).float()
    cfg = ("learner.lr=0.05",)
    tr, m = _one_step(model, groups, "none", *cfg)
    first, _ = _one_step(model, groups[:1], "none", *cfg, "learner.groups_per_step=1")   # after update 1
    ent, d, k3, clipped = [], [], [], 0
    for gi, grp in enumerate(groups):
        A = grp.rewards - grp.rewards.mean()
        for s, a in zip(grp.samples, A):
            prox, ent_T = _response_logprobs(model, s)
            ent.append(ent_T)
            d.append((prox - s.rollout_logprobs.double()).exp())
            log_rho = _response_logprobs(tr.model, s)[0] - prox
            k3.append(log_rho.exp() - 1 - log_rho)
            if gi == 1:   # the second update's ratio r is against the weights after the first
                r = (_response_logprobs(first.model, s)[0] - prox).exp()
                clipped += int(((a > 0) & (r > 1.27)).sum() + ((a < 0) & (r < 0.8)).sum())
    ent_t, d_t, k3_t = torch.cat(ent), torch.cat(d), torch.cat(k3)
    assert 0 < clipped < len(d_t) / 2 and float((d_t > 5).sum()) > 0   # the case exercises both masks
    want = {"policy/entropy": float(ent_t.mean()), "kl/staleness_k3": float(k3_t.mean()),
            "is/d_mean": float(d_t.mean()), "is/d_max": float(d_t.max()),
            "is/trunc_frac": float((d_t > 5).double().mean()), "loss/clip_frac": clipped / len(d_t)}
    for key, value in want.items():
        assert m[key] == pytest.approx(value, rel=1e-6, abs=1e-12), key


def test_wire_routes_of_many_experts_train_in_every_mode():
    # Expert ids >= 256 travel as uint16 (the smallest unsigned dtype, ALGORITHM.md section 5); through a
    # codec round trip they must train like the model's own int16 routes (torch has no uint16 arange).
    import numpy as np
    from minirl_async.proto.codec import decode, encode
    from minirl_async.proto.messages import Response, ScoredGroup

    model = tiny_model(num_experts=300)
    groups = make_groups(model, seed=5)
    wire = []
    for g in groups:
        responses = [Response(response_ids=s.response_ids.numpy().astype(np.int32),
                              logprobs=s.rollout_logprobs.numpy(), versions=np.zeros(len(s.response_ids), np.int32),
                              routes=s.routes.numpy().astype(np.uint16), finish_reason="length") for s in g.samples]
        sg = ScoredGroup(group_id=g.group_id, attempt=0, prompt_ids=g.samples[0].prompt_ids.numpy().astype(np.int32),
                         sampler_id="s0", responses=responses,
                         rewards=np.array([s.reward for s in g.samples], np.float32))
        got = decode(encode(sg))
        assert got.responses[0].routes.dtype == np.uint16
        wire.append(Group.from_scored(got))
    for mode in ("none", "r2", "r3"):
        w_wire = _weights(_one_step(model, wire, mode)[0])
        w_own = _weights(_one_step(model, groups, mode)[0])
        torch.testing.assert_close(w_wire, w_own, rtol=0, atol=1e-12)
