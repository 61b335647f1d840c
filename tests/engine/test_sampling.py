"""Sampling: frequencies match the (truncated) softmax (chi-square, fixed seeds), greedy, logprob definition.

    pytest tests/engine/test_sampling.py -q
"""

from __future__ import annotations

import random

import pytest
import torch

from minirl_async.engine.sampling import sample_tokens

# B rows, V vocab


def chi_square_pvalue(counts_V: torch.Tensor, probs_V: torch.Tensor) -> float:
    """Pearson chi-square goodness of fit over the tokens with positive expected mass."""
    n = counts_V.sum()
    support = probs_V > 0
    assert int(counts_V[~support].sum()) == 0, "a zero-probability token was sampled"
    expected = n * probs_V[support]
    stat = ((counts_V[support] - expected) ** 2 / expected).sum()
    df = int(support.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), stat.double() / 2))


def reference_probs(logits_V: torch.Tensor, temperature: float, top_p: float, top_k: int) -> torch.Tensor:
    """Plain definition: softmax(logits/T); keep the top_k most likely; then the smallest most-likely prefix
    whose mass reaches top_p; renormalise."""
    p = torch.softmax(logits_V.double() / temperature, -1)
    order = torch.argsort(p, descending=True)
    keep = torch.zeros_like(p, dtype=torch.bool)
    mass = 0.0
    for rank, tok in enumerate(order.tolist()):
        if top_k and rank >= top_k:
            break
        if rank > 0 and mass >= top_p:
            break
        keep[tok] = True
        mass += float(p[tok])
    q = torch.where(keep, p, torch.zeros_like(p))
    return q / q.sum()


@pytest.mark.parametrize("temperature, top_p, top_k", [(1.0, 1.0, 0), (0.7, 1.0, 0), (1.3, 0.8, 0), (1.0, 1.0, 5),
                                                       (0.9, 0.6, 4)])
def test_frequencies_match_distribution(temperature: float, top_p: float, top_k: int) -> None:
    gen = torch.Generator().manual_seed(0)
    V, N = 12, 20_000
    logits_V = torch.randn(V, generator=gen) * 1.5
    rng = random.Random(1234)
    u_B = torch.tensor([rng.random() for _ in range(N)], dtype=torch.float64)
    B = N
    tok_B, logp_B = sample_tokens(logits_V.expand(B, V), torch.full((B,), temperature), torch.full((B,), top_p),
                                  torch.full((B,), top_k, dtype=torch.long), u_B)
    probs = reference_probs(logits_V, temperature, top_p, top_k)
    counts = torch.bincount(tok_B, minlength=V).double()
    assert chi_square_pvalue(counts, probs) > 1e-3
    # logprob is under the untruncated tempered softmax (what the learner recomputes)
    full = torch.log_softmax(logits_V.double() / temperature, -1)
    assert torch.allclose(logp_B.double(), full[tok_B], atol=1e-6)


def test_chi_square_detects_a_wrong_distribution() -> None:
    """The test above has power: sampling at T=1 judged against T=0.7 fails."""
    gen = torch.Generator().manual_seed(0)
    V, N = 12, 20_000
    logits_V = torch.randn(V, generator=gen) * 1.5
    rng = random.Random(1)
    u_B = torch.tensor([rng.random() for _ in range(N)], dtype=torch.float64)
    tok_B, _ = sample_tokens(logits_V.expand(N, V), torch.ones(N), torch.ones(N), torch.zeros(N, dtype=torch.long),
                             u_B)
    counts = torch.bincount(tok_B, minlength=V).double()
    assert chi_square_pvalue(counts, reference_probs(logits_V, 0.7, 1.0, 0)) < 1e-6


def test_greedy_rows_and_rows_are_independent() -> None:
    gen = torch.Generator().manual_seed(3)
    logits_BV = torch.randn(4, 10, generator=gen, dtype=torch.float64)
    temp_B = torch.tensor([0.0, 1.0, 0.0, 0.5])
    u_B = torch.tensor([0.3, 0.3, 0.9, 0.9], dtype=torch.float64)
    tok_B, logp_B = sample_tokens(logits_BV, temp_B, torch.ones(4), torch.zeros(4, dtype=torch.long), u_B)
    assert tok_B[0] == logits_BV[0].argmax() and tok_B[2] == logits_BV[2].argmax()
    # greedy logprob is under logits / 1
    assert torch.allclose(logp_B[0].double(), torch.log_softmax(logits_BV[0], -1)[tok_B[0]], atol=1e-7)
    # a row's draw depends only on its own logits and uniform
    for i in (1, 3):
        t1, _ = sample_tokens(logits_BV[i:i + 1], temp_B[i:i + 1], torch.ones(1), torch.zeros(1, dtype=torch.long),
                              u_B[i:i + 1])
        assert t1[0] == tok_B[i]
    # inverse CDF by hand for row 1
    cdf = torch.softmax(logits_BV[1], -1).cumsum(0)
    assert tok_B[1] == int((cdf <= 0.3).sum())
