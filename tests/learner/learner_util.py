"""Helpers of the learner tests (imported by conftest.py and the tests): a tiny Qwen3-MoE, a run config, and synthetic groups whose rollout
log-probs and routes come from the model itself (so mu == pi unless a test perturbs them)."""

from __future__ import annotations

import torch

from minirl_async.config import Config, load_config
from minirl_async.learner.batch import Group, Sample
from minirl_async.models.config import ModelConfig
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM
from minirl_async.models.routing import Routing

TINY = dict(vocab_size=32, hidden_size=16, intermediate_size=24, moe_intermediate_size=8, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_experts_per_tok=2,
            initializer_range=0.2)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kw: object) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    return Qwen3MoeForCausalLM(ModelConfig(**{**TINY, **kw})).to(dtype)


def run_config(*overrides: str) -> Config:
    base = ["learner.compute_dtype=fp32", "learner.groups_per_step=2", "learner.minibatch_groups=1",
            "algo.group_size=2", "sampler.max_batch_size=4", "learner.lr=0.01", "learner.grad_clip=100.0"]
    return load_config(None, base + list(overrides))


def make_groups(model: Qwen3MoeForCausalLM, num_groups: int = 2, G: int = 3, seed: int = 0,
                rewards: list[list[float]] | None = None) -> list[Group]:
    """Random prompts/responses; rollout log-probs and routes from `model` (on-policy)."""
    g = torch.Generator().manual_seed(seed)
    V = model.config.vocab_size
    groups = []
    for gi in range(num_groups):
        P = int(torch.randint(2, 5, (1,), generator=g))
        prompt = torch.randint(0, V, (P,), generator=g)
        samples = []
        for j in range(G):
            R = int(torch.randint(1, 6, (1,), generator=g))
            resp = torch.randint(0, V, (R,), generator=g)
            seq = torch.cat([prompt, resp])
            rec = Routing("record")
            with torch.no_grad():
                logits = model(seq[None, :-1], routing=rec)[0]
            lp = torch.log_softmax(logits.double(), -1)[P - 1:].gather(-1, resp[:, None]).squeeze(-1)
            reward = rewards[gi][j] if rewards is not None else float(torch.randint(0, 2, (1,), generator=g))
            assert rec.recorded_BTLK is not None
            samples.append(Sample(prompt_ids=prompt, response_ids=resp, rollout_logprobs=lp.float(), reward=reward,
                                  versions=torch.zeros(R, dtype=torch.long), routes=rec.recorded_BTLK[0]))
        groups.append(Group(group_id=f"g{gi}", samples=samples))
    return groups


