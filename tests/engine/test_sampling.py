"""Sampling against a plain reference: frequencies match the truncated renormalised softmax q (chi-square,
fixed seeds), the recorded logprob is log q, greedy, rows independent of the batch, no zero-mass token ever.

    pytest tests/engine/test_sampling.py -q
"""

from __future__ import annotations

import random

import pytest
import torch
from engine_testkit import chi_square_pvalue

from minirl_async.engine.sampling import sample_tokens

# B rows, V vocab


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
    tok_B, logp_B = sample_tokens(logits_V.expand(B, V), torch.full((B,), temperature),
                                  torch.full((B,), top_p, dtype=torch.float64),
                                  torch.full((B,), top_k, dtype=torch.long), u_B)
    probs = reference_probs(logits_V, temperature, top_p, top_k)
    counts = torch.bincount(tok_B, minlength=V).double()
    assert chi_square_pvalue(counts, probs) > 1e-3
    # logprob is log q: under the distribution the token was drawn from (truncated and renormalised)
    assert torch.allclose(logp_B.double(), probs.log()[tok_B], atol=1e-6)
    if top_p < 1 or top_k:   # the truncation is real in these cases: log q differs from log p by log Z
        full = torch.log_softmax(logits_V.double() / temperature, -1)
        assert float((logp_B.double() - full[tok_B]).min()) > 1e-3


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


def test_logprob_is_log_q_per_row_in_a_mixed_batch() -> None:
    """Rows with different truncations in one batch: each row's logprob is log q of its own q (log p for
    the untruncated and greedy rows), in float32 and bf16 logits as well as float64."""
    gen = torch.Generator().manual_seed(5)
    V = 16
    settings = [(1.0, 1.0, 0), (0.8, 0.7, 0), (1.0, 1.0, 3), (1.2, 0.5, 6), (0.0, 0.5, 2), (1.0, 1.0, V)]
    B = len(settings)
    logits_BV = torch.randn(B, V, generator=gen, dtype=torch.float64) * 2
    u_B = torch.rand(B, generator=gen, dtype=torch.float64)
    temp_B = torch.tensor([s[0] for s in settings])
    top_p_B = torch.tensor([s[1] for s in settings], dtype=torch.float64)
    top_k_B = torch.tensor([s[2] for s in settings])
    for dtype, atol in ((torch.float64, 1e-6), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        logits = logits_BV.to(dtype)
        tok_B, logp_B = sample_tokens(logits, temp_B, top_p_B, top_k_B, u_B)
        for i, (t, p, k) in enumerate(settings):
            ref_logits = logits[i].double()
            if t == 0:
                assert tok_B[i] == ref_logits.argmax()
                want = torch.log_softmax(ref_logits, -1)[tok_B[i]]
            else:
                want = reference_probs(ref_logits, t, p, k).log()[tok_B[i]]
            assert abs(float(logp_B[i]) - float(want)) < atol, (dtype, settings[i])


def test_no_zero_mass_token_when_u_is_next_to_one() -> None:
    """u just below 1 must draw the last kept token, never a token outside top-k / with zero probability
    (float32(1 - 1e-9) is 1.0: the old float32 target hit the end of the CDF and clamped to V - 1)."""
    V = 10
    logits = torch.tensor([3.0, 2.0, 1.0, 0.5, 0.0, -1.0, -2.0, -3.0, -4.0, float("-inf")])
    for dtype in (torch.bfloat16, torch.float32, torch.float64):
        for u in (1 - 1e-9, 1 - 2 ** -53, 0.0):
            for top_k, kept in ((2, {0, 1}), (0, set(range(V - 1)))):
                tok, logp = sample_tokens(logits.to(dtype)[None], torch.ones(1), torch.ones(1), torch.tensor([top_k]),
                                          torch.tensor([u], dtype=torch.float64))
                assert int(tok) in kept, (dtype, u, top_k, int(tok))
                assert bool(torch.isfinite(logp).all())
                if u > 0.5:   # the last kept token in vocabulary order
                    assert int(tok) == max(kept)


def test_untruncated_row_does_not_depend_on_a_truncating_neighbour() -> None:
    """Whether to truncate is decided per row: a top_p = 1 row draws the same token alone and next to a top-k
    row. Here the row's two head tokens sum to 1.0 in float32, so truncating it (old: the whole batch was
    truncated when any row asked) dropped its tail, which the inverse CDF at u < tail mass must return."""
    row = torch.tensor([-25.0, -25.0, 0.0, 0.0])                 # tail mass ~1.4e-11 at the start of the vocab
    other = torch.tensor([1.0, 2.0, 3.0, 4.0])
    u_B = torch.tensor([3e-12, 0.5], dtype=torch.float64)       # token 0 holds [0, 6.9e-12) of the mass
    alone, logp_alone = sample_tokens(row[None], torch.ones(1), torch.ones(1), torch.zeros(1, dtype=torch.long),
                                      u_B[:1])
    assert int(alone) == 0
    both, logp_both = sample_tokens(torch.stack([row, other]), torch.ones(2), torch.ones(2), torch.tensor([0, 2]),
                                    u_B)
    assert int(both[0]) == int(alone) and torch.equal(logp_both[0], logp_alone[0])
    assert int(both[1]) in (2, 3)
