"""Sampler -> learner round trip at temperature 0.7: the embedded engine (fp64, no FP8) samples with routes,
and the learner's R3 proximal pass at the same temperature reproduces the sampler's log-probs exactly
(train-inference k3 ~ 0, routing agreement 1); at temperature 1 it does not."""

from __future__ import annotations

import copy

import pytest
import torch
from learner_util import run_config

from minirl_async.engine.base import GenerateRequest, SamplingParams
from minirl_async.engine.torch_fp8 import TorchFP8Engine
from minirl_async.learner import Group, Sample, Trainer
from minirl_async.models.hf_io import iter_hf_state

T_SAMPLE = 0.7


@pytest.fixture
def sampled_groups(model) -> list[Group]:
    eng = TorchFP8Engine(model.config, fp8=False, dtype=torch.float64, max_batch_size=4)
    eng.update_weights(0, iter_hf_state(model))
    reqs = [GenerateRequest(p, SamplingParams(temperature=T_SAMPLE, max_new_tokens=6, n=3, seed=i))
            for i, p in enumerate([[1, 2, 3], [4, 5]])]
    groups = []
    for gi, rolls in enumerate(eng.generate(reqs)):
        samples = []
        for j, r in enumerate(rolls):
            assert r.routes is not None and len(r.response_ids) > 0
            samples.append(Sample(torch.tensor(reqs[gi].prompt_ids), r.response_ids, r.logprobs, float(j % 2),
                                  r.versions, r.routes))
        groups.append(Group(f"g{gi}", samples))
    return groups


def test_learner_temperature_matches_sampler(model, sampled_groups):
    tr = Trainer(run_config(f"sampler.temperature={T_SAMPLE}"), copy.deepcopy(model))
    m = tr.train_step(sampled_groups, "r3")
    assert m["kl/train_infer_k3"] < 1e-8 and abs(m["kl/train_infer_k1"]) < 1e-6   # rollout lp are float32
    assert m["routing/agree_frac"] == 1.0
    # a learner at temperature 1 sees another distribution than the one sampled from
    tr1 = Trainer(run_config("sampler.temperature=1.0"), copy.deepcopy(model))
    m1 = tr1.train_step(sampled_groups, "r3")
    assert m1["kl/train_infer_k3"] > 1e-3
