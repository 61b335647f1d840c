"""Training samples, their validation at the learner's edge, and padding into a `[B, T]` batch.

A `Group` is the G responses to one prompt with their rewards (the learner never trains on part of a
group: the advantage baseline is the group mean). `Group.from_scored(scored_group)` converts the wire
message (`minirl_async.proto.messages.ScoredGroup`); `validate_group` rejects bad data with a `BatchError`
naming the group; `collate` pads a list of samples to one batch.

Layout of a row (prompt p_0..p_{P-1}, response y_0..y_{R-1}, full sequence s = p + y of length P+R):
the input is `s[:-1]` and the targets `s[1:]`, both of length P+R-1, right-padded to T. Target position j
predicts `s[j+1]`, so response token y_k sits at position `P-1+k`; `response_mask` marks those positions.
The sampler's routes `[P+R-1, L, K]` cover exactly the input positions (SGLang's layout: every position
but the last), so they line up with the input row by row. Padding positions are never in a mask; with
right padding and causal attention they cannot influence real positions.

Legend: B samples, T positions (max P+R-1), L MoE layers, K top-k.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch

from minirl_async.models.routing import batch_routes


class BatchError(ValueError):
    """A group the learner refuses to train on; the message names the group and what is wrong."""


@dataclass
class Sample:
    """One response with everything the learner needs (field names are the shared rollout contract)."""

    prompt_ids: torch.Tensor
    """Prompt token ids `[P]` (P >= 1)."""
    response_ids: torch.Tensor
    """Response token ids `[R]` (R >= 1)."""
    rollout_logprobs: torch.Tensor
    """Sampler log-prob of each response token under logits / temperature `[R]` (log mu_old)."""
    reward: float
    """Scalar sequence reward."""
    versions: torch.Tensor | None = None
    """Weight version of each response token `[R]` (for lag metrics; the learner does not need it)."""
    routes: torch.Tensor | None = None
    """Sampler's top-k experts `[P+R-1, L, K]` (every position but the last) or None."""


@dataclass
class Group:
    """The G >= 2 responses to one prompt."""

    group_id: str
    samples: list[Sample] = field(default_factory=list)

    @property
    def rewards(self) -> torch.Tensor:
        return torch.tensor([s.reward for s in self.samples], dtype=torch.float64)

    @classmethod
    def from_scored(cls, sg: Any) -> Group:
        """From a `ScoredGroup` (numpy arrays are wrapped without copies)."""
        def t(x: Any) -> torch.Tensor:
            return torch.as_tensor(x)

        def routes(x: Any) -> torch.Tensor | None:
            # the wire's uint16 (ids >= 256): torch has few ops for it; int32 is what routes_dtype uses
            r = None if x is None else t(x)
            return r.to(torch.int32) if r is not None and r.dtype in (torch.uint16, torch.uint32) else r
        samples = [Sample(prompt_ids=t(sg.prompt_ids).long(), response_ids=t(r.response_ids).long(),
                          rollout_logprobs=t(r.logprobs), reward=float(sg.rewards[i]),
                          versions=t(r.versions), routes=routes(r.routes))
                   for i, r in enumerate(sg.responses)]
        return cls(group_id=str(sg.group_id), samples=samples)


def validate_group(g: Group, *, vocab_size: int, num_experts: int, num_moe_layers: int, top_k: int) -> None:
    """Raise `BatchError` naming the group if it must not be trained on."""
    where = f"group {g.group_id!r}"
    if len(g.samples) < 2:
        raise BatchError(f"{where}: {len(g.samples)} response(s); a group baseline needs at least 2 "
                         "(set algo.group_size >= 2)")
    for i, s in enumerate(g.samples):
        at = f"{where} sample {i}"
        P, R = int(s.prompt_ids.numel()), int(s.response_ids.numel())
        if s.prompt_ids.dim() != 1 or s.response_ids.dim() != 1:
            raise BatchError(f"{at}: prompt_ids and response_ids must be 1-D")
        if P == 0:
            raise BatchError(f"{at}: empty prompt")
        if R == 0:
            raise BatchError(f"{at}: empty response (the sampler should not send it; re-issue the prompt)")
        for name, ids in (("prompt_ids", s.prompt_ids), ("response_ids", s.response_ids)):
            if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
                raise BatchError(f"{at}: {name} outside [0, {vocab_size})")
        if tuple(s.rollout_logprobs.shape) != (R,):
            raise BatchError(f"{at}: rollout_logprobs has shape {tuple(s.rollout_logprobs.shape)}, expected ({R},)")
        if not torch.isfinite(s.rollout_logprobs).all():
            raise BatchError(f"{at}: rollout_logprobs contain NaN or inf")
        if not math.isfinite(s.reward):
            raise BatchError(f"{at}: reward is {s.reward}")
        if s.versions is not None and tuple(s.versions.shape) != (R,):
            raise BatchError(f"{at}: versions has shape {tuple(s.versions.shape)}, expected ({R},)")
        if s.routes is not None:
            want = (P + R - 1, num_moe_layers, top_k)
            if tuple(s.routes.shape) != want:
                raise BatchError(f"{at}: routes have shape {tuple(s.routes.shape)}, expected {want} "
                                 "[prompt_len + response_len - 1, MoE layers, top-k]")
            r = s.routes.long()
            if r.numel() and (int(r.min()) < 0 or int(r.max()) >= num_experts):
                raise BatchError(f"{at}: routes hold expert ids outside [0, {num_experts})")


@dataclass
class Batch:
    """Padded tensors of B samples (see the module docstring for the layout)."""

    input_ids_BT: torch.Tensor
    targets_BT: torch.Tensor
    response_mask_BT: torch.Tensor       # bool: target is a response token
    valid_BT: torch.Tensor               # bool: a real (non-padding) position
    rollout_logprobs_BT: torch.Tensor    # float32, 0 outside the response
    advantages_B: torch.Tensor
    routes_BTLK: torch.Tensor | None     # sampler routes (filler 0..K-1 on padding) or None
    version_min_B: torch.Tensor | None   # oldest token version per sample, or None

    @property
    def num_tokens(self) -> int:
        """Response tokens in the batch."""
        return int(self.response_mask_BT.sum())

    def to(self, device: torch.device | str) -> Batch:
        def mv(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x.to(device)
        return Batch(self.input_ids_BT.to(device), self.targets_BT.to(device), self.response_mask_BT.to(device),
                     self.valid_BT.to(device), self.rollout_logprobs_BT.to(device), self.advantages_B.to(device),
                     mv(self.routes_BTLK), mv(self.version_min_B))


def collate(samples: list[Sample], advantages: list[float], pad_id: int = 0) -> Batch:
    """Right-pad `samples` (already validated) into a Batch; routes are kept only if every sample has them."""
    if not samples or len(samples) != len(advantages):
        raise ValueError(f"collate needs one advantage per sample, got {len(samples)} samples "
                         f"and {len(advantages)} advantages")
    lens = [int(s.prompt_ids.numel() + s.response_ids.numel() - 1) for s in samples]
    B, T = len(samples), max(lens)
    ids_BT = torch.full((B, T + 1), pad_id, dtype=torch.long)
    resp_BT = torch.zeros(B, T, dtype=torch.bool)
    valid_BT = torch.zeros(B, T, dtype=torch.bool)
    mu_BT = torch.zeros(B, T, dtype=torch.float32)
    for i, s in enumerate(samples):
        P, R = int(s.prompt_ids.numel()), int(s.response_ids.numel())
        ids_BT[i, :P] = s.prompt_ids
        ids_BT[i, P:P + R] = s.response_ids
        resp_BT[i, P - 1:P - 1 + R] = True
        valid_BT[i, :lens[i]] = True
        mu_BT[i, P - 1:P - 1 + R] = s.rollout_logprobs.float()
    routes = None
    if all(s.routes is not None for s in samples):
        routes = batch_routes([s.routes for s in samples if s.routes is not None], T)
    versions = None
    if all(s.versions is not None for s in samples):
        versions = torch.tensor([int(s.versions.min()) for s in samples if s.versions is not None])
    return Batch(input_ids_BT=ids_BT[:, :-1].contiguous(), targets_BT=ids_BT[:, 1:].contiguous(),
                 response_mask_BT=resp_BT, valid_BT=valid_BT, rollout_logprobs_BT=mu_BT,
                 advantages_B=torch.tensor(advantages, dtype=torch.float64), routes_BTLK=routes,
                 version_min_B=versions)
