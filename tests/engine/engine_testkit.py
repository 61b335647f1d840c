"""Shared pieces of the engine tests: a tiny Qwen3-MoE config, float64 models and engines on it, the
full-recompute reference decode, a chi-square p-value, and the prompts the tests share.
(Imported as `engine_testkit`: this folder's conftest.py puts it on sys.path.)
"""

from __future__ import annotations

import torch

from minirl_async.engine.torch_fp8 import TorchFP8Engine
from minirl_async.models.config import ModelConfig
from minirl_async.models.hf_io import iter_hf_state
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM


def tiny() -> ModelConfig:
    # layer 1 dense, layers 0 and 2 MoE: routes have L = 2 entries, and the dense path is exercised
    return ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=40)


def model64(cfg: ModelConfig, seed: int = 0, std: float = 0.3) -> Qwen3MoeForCausalLM:
    torch.manual_seed(seed)
    m = Qwen3MoeForCausalLM(cfg).double()
    with torch.no_grad():  # larger than the 0.02 init so routing and sampling are far from uniform
        for n, p in m.named_parameters():
            if not n.endswith("norm.weight"):
                p.normal_(0, std)
    return m.requires_grad_(False)


def engine64(cfg: ModelConfig, model: Qwen3MoeForCausalLM, **kw: object) -> TorchFP8Engine:
    eng = TorchFP8Engine(cfg, fp8=False, dtype=torch.float64, **kw)  # type: ignore[arg-type]
    eng.update_weights(0, iter_hf_state(model))
    return eng


def reference_decode(model: Qwen3MoeForCausalLM, prompt: list[int], tokens: list[int],
                     temperature: float) -> tuple[list[int], list[float]]:
    """Greedy continuation and the logprob of each given token, by full recompute."""
    ids, greedy, logps = list(prompt), [], []
    for t in tokens:
        logits = model(torch.tensor([ids]))[0, -1]
        greedy.append(int(logits.argmax()))
        T = temperature if temperature > 0 else 1.0
        logps.append(float(torch.log_softmax(logits / T, -1)[t]))
        ids.append(t)
    return greedy, logps


def chi_square_pvalue(counts_V: torch.Tensor, probs_V: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the tokens with positive expected mass."""
    n = counts_V.sum()
    support = probs_V > 0
    assert int(counts_V[~support].sum()) == 0, "a zero-probability token was sampled"
    expected = n * probs_V[support]
    stat = ((counts_V[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [4], [7, 7, 2, 9, 30]]
