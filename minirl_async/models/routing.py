"""Router modes of one forward pass: free routing, RECORD the chosen experts, or REPLAY given ones.

The model never decides the mode; the caller passes a `Routing` object (ALGORITHM.md §5):

    rec = Routing("record");  model(ids_BT, routing=rec);  idx_BTLK = rec.recorded_BTLK   # R2 proximal pass
    model(ids_BT, routing=Routing("replay", replay_BTLK=idx_BTLK))                       # R2/R3 updates

REPLAY fixes only the expert indices. The gating weights are always recomputed from the live router:
`p = softmax(router_logits)`, gather `p` at the replayed indices, renormalise when `norm_topk_prob`; so the
router still receives gradients. `replay_gates` is that computation, shared by the model and its tests.

Legend: B batch, T tokens, L MoE layers (one entry per MoE layer, in `ModelConfig.moe_layer_ids` order),
K top-k, E experts, N flattened tokens (B*T).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

RoutingMode = Literal["free", "record", "replay"]


def routes_dtype(num_experts: int) -> torch.dtype:
    """Smallest dtype that holds expert ids 0..num_experts-1: uint8 up to 256 experts, else int16/int32
    (torch has no uint16/uint32 tensors that every op and the wire whitelist support)."""
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    if num_experts <= 256:
        return torch.uint8
    if num_experts <= 2**15:
        return torch.int16
    return torch.int32


@dataclass
class Routing:
    """Router mode of one forward; after a RECORD forward, `recorded_BTLK` holds the top-k indices
    `[B, T, L_moe, K]` in `routes_dtype(num_experts)`. In REPLAY mode `replay_BTLK` (any integer dtype)
    gives the indices to use; its shape must be `[B, T, L_moe, K]` of the forward's input."""

    mode: RoutingMode = "free"
    replay_BTLK: torch.Tensor | None = None
    recorded_BTLK: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.mode not in ("free", "record", "replay"):
            raise ValueError(f"routing mode must be 'free', 'record' or 'replay', got {self.mode!r}")
        if self.mode == "replay" and self.replay_BTLK is None:
            raise ValueError("routing mode 'replay' needs replay_BTLK [B, T, L_moe, K]")
        if self.mode != "replay" and self.replay_BTLK is not None:
            raise ValueError(f"replay_BTLK given but routing mode is {self.mode!r}; use mode='replay'")

    def check_replay(self, B: int, T: int, num_moe_layers: int, top_k: int, num_experts: int) -> torch.Tensor:
        """Validate `replay_BTLK` against the forward's shape and return it as int64."""
        assert self.replay_BTLK is not None
        want = (B, T, num_moe_layers, top_k)
        if tuple(self.replay_BTLK.shape) != want:
            raise ValueError(f"replay_BTLK has shape {tuple(self.replay_BTLK.shape)}, expected {want} "
                             "[batch, tokens, MoE layers, top-k]")
        idx_BTLK = self.replay_BTLK.long()
        if idx_BTLK.numel() and (int(idx_BTLK.min()) < 0 or int(idx_BTLK.max()) >= num_experts):
            raise ValueError(f"replay_BTLK holds expert ids outside [0, {num_experts})")
        return idx_BTLK


def router_probs(logits_NE: torch.Tensor) -> torch.Tensor:
    """Softmax over experts in at least float32 (HF and SGLang do the router softmax in float32; fp64 stays
    fp64 so reference tests are exact)."""
    dtype = torch.float64 if logits_NE.dtype == torch.float64 else torch.float32
    return torch.softmax(logits_NE.to(dtype), dim=-1)


def replay_gates(probs_NE: torch.Tensor, idx_NK: torch.Tensor, norm_topk_prob: bool) -> torch.Tensor:
    """Gating weights at the given experts: gather the live probabilities, renormalise if asked.
    Free routing uses this too (with its own top-k indices), which is what makes REPLAY of RECORDed
    indices bit-identical to free routing."""
    w_NK = probs_NE.gather(-1, idx_NK)
    if norm_topk_prob:
        w_NK = w_NK / w_NK.sum(dim=-1, keepdim=True)
    return w_NK


def batch_routes(routes: Sequence[torch.Tensor], T: int, offsets: Sequence[int] | None = None) -> torch.Tensor:
    """Place per-sequence routes `[t_i, L, K]` (the sampler/SGLang layout, `t_i = prompt_len + response_len
    - 1`) into a replay batch `[B, T, L, K]`: sequence i fills rows `offsets[i] .. offsets[i] + t_i`
    (default 0: right padding; `T - t_i` gives left padding). Other rows get experts `0..K-1` (valid and
    distinct); the caller masks those positions out of the loss. Dtype is that of the inputs."""
    if not routes:
        raise ValueError("batch_routes needs at least one sequence")
    L, K = routes[0].shape[1:]
    offs = list(offsets) if offsets is not None else [0] * len(routes)
    if len(offs) != len(routes):
        raise ValueError(f"{len(offs)} offsets for {len(routes)} sequences")
    filler_K = torch.arange(K, device=routes[0].device).to(routes[0].dtype)   # (no arange for uint16 on CPU)
    out_BTLK = filler_K.expand(len(routes), T, L, K).clone()
    for i, (r, o) in enumerate(zip(routes, offs)):
        if r.dim() != 3 or tuple(r.shape[1:]) != (L, K):
            raise ValueError(f"routes[{i}] has shape {tuple(r.shape)}, expected [tokens, {L}, {K}]")
        if o < 0 or o + r.shape[0] > T:
            raise ValueError(f"routes[{i}] ({r.shape[0]} tokens at offset {o}) does not fit in T={T}")
        out_BTLK[i, o:o + r.shape[0]] = r
    return out_BTLK
