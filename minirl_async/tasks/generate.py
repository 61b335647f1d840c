"""A small batched sampling loop over the policy model, for evaluation and the SFT progress check.

This is not the sampler engine (`minirl_async.engine`, FP8 weights, routes, per-request seeds); it is the
plain reference: bf16/fp32 weights, a growing KV cache through the model's `kv_cache` hook, left-padded
prompts with explicit position ids and a boolean mask, temperature sampling (0 = greedy) from one
generator. Responses include the eos token when they stop; `finish_reason` is "stop" or "length".

    out = generate(model, [tok.encode_prompt(p) for p in prompts], max_new_tokens=48, temperature=1.0,
                   eos_id=tok.eos_id, pad_id=tok.pad_id, seed=0)
    out.response_ids[i], out.finish_reasons[i]

Legend: B batch, P longest prompt, T new tokens this forward, S key tokens (cache + new), H kv heads, d head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class ConcatKVCache:
    """The simplest cache: per layer, keys/values concatenated along the token axis."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}
        self.v: dict[int, torch.Tensor] = {}

    def update(self, layer_idx: int, k_BHTd: torch.Tensor, v_BHTd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.k:
            self.k[layer_idx] = torch.cat([self.k[layer_idx], k_BHTd], dim=2)
            self.v[layer_idx] = torch.cat([self.v[layer_idx], v_BHTd], dim=2)
        else:
            self.k[layer_idx], self.v[layer_idx] = k_BHTd, v_BHTd
        return self.k[layer_idx], self.v[layer_idx]


@dataclass
class Generation:
    response_ids: list[list[int]]
    finish_reasons: list[str]


@torch.no_grad()
def generate(model: torch.nn.Module, prompt_ids: list[list[int]], max_new_tokens: int, temperature: float,
             eos_id: int, pad_id: int, seed: int = 0, batch_size: int = 256) -> Generation:
    """Sample a response for every prompt (batches of `batch_size`)."""
    out_ids: list[list[int]] = []
    reasons: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompt_ids), batch_size):
        ids, why = _generate_batch(model, prompt_ids[start:start + batch_size], max_new_tokens, temperature,
                                   eos_id, pad_id, gen)
        out_ids += ids
        reasons += why
    return Generation(out_ids, reasons)


def _generate_batch(model: torch.nn.Module, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                    eos_id: int, pad_id: int, gen: torch.Generator) -> tuple[list[list[int]], list[str]]:
    device = next(model.parameters()).device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids_BP = torch.full((B, P), pad_id, dtype=torch.long)
    valid_BS = torch.zeros(B, P + max_new_tokens, dtype=torch.bool)  # which key slots hold real tokens
    for i, p in enumerate(prompts):
        ids_BP[i, P - len(p):] = torch.tensor(p)
        valid_BS[i, P - len(p):P] = True
    pos_BP = (valid_BS[:, :P].long().cumsum(-1) - 1).clamp(min=0)
    # Prefill mask: causal and only real keys; every query also sees itself so no row is all-masked (a
    # fully masked row gives NaN, and NaN values at pad slots would poison later steps via 0 * NaN).
    causal_PP = torch.tril(torch.ones(P, P, dtype=torch.bool))
    mask_B1PP = (causal_PP[None] & valid_BS[:, None, :P]) | torch.eye(P, dtype=torch.bool)[None]
    cache = ConcatKVCache()
    logits_BTV = model(ids_BP.to(device), position_ids_BT=pos_BP.to(device), kv_cache=cache,
                       attn_mask=mask_B1PP[:, None].to(device))
    next_pos_B = pos_BP[:, -1] + 1
    done_B = torch.zeros(B, dtype=torch.bool)
    responses: list[list[int]] = [[] for _ in range(B)]
    for t in range(max_new_tokens):
        logits_BV = logits_BTV[:, -1].float().cpu()
        if temperature > 0:
            probs_BV = torch.softmax(logits_BV / temperature, dim=-1)
            tok_B = torch.multinomial(probs_BV, 1, generator=gen).squeeze(1)
        else:
            tok_B = logits_BV.argmax(-1)
        for i in range(B):
            if not done_B[i]:
                responses[i].append(int(tok_B[i]))
        done_B |= tok_B == eos_id
        if bool(done_B.all()) or t == max_new_tokens - 1:
            break
        valid_BS[:, P + t] = True
        mask_B11S = valid_BS[:, None, None, :P + t + 1]
        logits_BTV = model(tok_B[:, None].to(device), position_ids_BT=next_pos_B[:, None].to(device),
                           kv_cache=cache, attn_mask=mask_B11S.to(device))
        next_pos_B = next_pos_B + 1
    reasons = ["stop" if r and r[-1] == eos_id else "length" for r in responses]
    return responses, reasons
