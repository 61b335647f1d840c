"""The sampler engine interface: requests in, rollouts out, versioned weight updates, pause/resume/health.

Two engines implement it: `torch_fp8.TorchFP8Engine` (embedded, pure PyTorch, CPU/GPU) and
`sglang_engine.SGLangEngine` (adapter over `sglang.Engine`, GPU, optional extra). `make_engine(cfg)` picks
one from `sampler.engine`.

    engine = make_engine(cfg, model_cfg=mcfg, state=iter_hf_state(model), version=0)
    out = engine.generate([GenerateRequest(prompt_ids=[1, 2, 3], params=SamplingParams(n=4, seed=7))])
    out[0][2].response_ids, out[0][2].logprobs, out[0][2].routes     # request 0, sample 2
    engine.update_weights(1, named_tensors)                          # HF names; FP8 + scale or plain

Threading (both engines): `generate` is SYNCHRONOUS and blocking; the sampler service runs it in one worker
thread (`await asyncio.to_thread(engine.generate, reqs)`), never two at once. `update_weights`, `pause`,
`resume` and `health` are thread-safe and may be called from another thread while `generate` runs:
an update is validated and prepared outside any lock, then swapped in at the next version boundary (end of
the running batch, or the next decode step in interruptible mode), so a sequence never sees a half-updated
model. `update_weights` returns once the new version is live.

Bad input never takes the batch down: a request whose prompt is empty, longer than the context, or whose
sampling parameters are invalid comes back as `n` rollouts with `finish_reason="abort"`, no tokens and
`error` set to a message saying what to change; the other requests are served normally. Weight updates that
are malformed (missing / extra / misshaped tensors, a version that does not increase) raise
`WeightUpdateError` (a ValueError) and the old weights stay in place.

Legend: P prompt tokens, R response tokens, L MoE layers, K top-k experts.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch

if TYPE_CHECKING:
    from minirl_async.config import Config
    from minirl_async.models.config import ModelConfig

FinishReason = Literal["stop", "length", "abort"]
NamedTensors = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]


class WeightUpdateError(ValueError):
    """A weight update was refused; the engine keeps serving with its previous weights."""


MIN_TEMPERATURE = 1e-5
"""Smallest positive temperature: below it `logits / T` overflows (NaN log-probs); 0 means greedy."""
SEED_RANGE = (-(2 ** 63), 2 ** 63)
"""Seeds seed .. seed + n - 1 must be 64-bit signed integers (SGLang's `sampling_seed` is an int64)."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample the responses of one request (SGLang's parameter names)."""

    temperature: float = 1.0
    """0 = greedy; logprobs are then those of `logits / 1` (as the learner computes them)."""
    top_p: float = 1.0
    """Nucleus mass in (0, 1]."""
    top_k: int = 0
    """Keep the k most likely tokens (0 = off)."""
    max_new_tokens: int = 64
    """Longest response (also capped by the context length)."""
    stop_token_ids: tuple[int, ...] = ()
    """Generation of a sample stops after it emits one of these (the stop token is kept in the response)."""
    n: int = 1
    """Samples drawn for this prompt."""
    seed: int | None = None
    """Sample j draws its uniforms from its own stream seeded with seed + j, so nothing random depends on the
    batch. The tokens are exactly reproducible whatever else is in the batch only when the logits are: in
    float64 (tested). In bf16/fp32 the kernels' rounding depends on the batch shape (logprobs move by ~1e-2
    in bf16), which can flip a token whose uniform falls near a CDF boundary, after which the sample
    diverges; the same batch on the same engine reproduces exactly."""

    def check(self) -> None:
        """Raise ValueError naming the bad parameter and its valid range."""
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and (self.temperature == 0 or self.temperature >= MIN_TEMPERATURE)):
            raise ValueError(f"temperature={self.temperature!r}: must be 0 (greedy) or a finite number >= "
                             f"{MIN_TEMPERATURE:g} (smaller ones overflow logits / T)")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p={self.top_p!r}: must be in (0, 1] (1 = off)")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise ValueError(f"top_k={self.top_k!r}: must be an integer >= 0 (0 = off)")
        if not (isinstance(self.max_new_tokens, int) and self.max_new_tokens >= 1):
            raise ValueError(f"max_new_tokens={self.max_new_tokens!r}: must be an integer >= 1")
        if not (isinstance(self.n, int) and self.n >= 1):
            raise ValueError(f"n={self.n!r}: must be an integer >= 1")
        if not isinstance(self.stop_token_ids, (tuple, list)) or any(
                not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r}: must be a tuple of non-negative token ids")
        if self.seed is not None and not (isinstance(self.seed, int) and not isinstance(self.seed, bool)
                                          and SEED_RANGE[0] <= self.seed and self.seed + self.n <= SEED_RANGE[1]):
            raise ValueError(f"seed={self.seed!r}: must be None or an integer with seed .. seed + n - 1 in "
                             f"[-2**63, 2**63)")


@dataclass
class GenerateRequest:
    """One prompt and how to sample it. `prompt_ids` may be a list, a 1-D tensor or a numpy array."""

    prompt_ids: Sequence[int] | torch.Tensor
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""

    def prompt_list(self) -> list[int]:
        """The prompt as a list of ints; ValueError if it is not a 1-D sequence of integers."""
        p = self.prompt_ids
        if isinstance(p, torch.Tensor):
            if p.dim() != 1 or p.is_floating_point() or p.is_complex():
                raise ValueError(f"prompt_ids must be a 1-D integer tensor, got {p.dtype} of shape {tuple(p.shape)}")
            return [int(t) for t in p.tolist()]
        try:
            return [operator.index(t) for t in p]
        except TypeError as e:
            raise ValueError(f"prompt_ids must be a 1-D sequence of integer token ids: {e}") from None

    def check(self, vocab_size: int, max_context: int) -> list[int]:
        """Validate against the engine; returns the prompt as a list. Raises ValueError saying what to fix."""
        self.params.check()
        prompt = self.prompt_list()
        if not prompt:
            raise ValueError("empty prompt: give at least one prompt token")
        if len(prompt) >= max_context:
            raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the context of {max_context} "
                             f"tokens; shorten the prompt to at most {max_context - 1} tokens (or raise sampler.max_context)")
        bad = [t for t in prompt if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt holds token ids outside [0, {vocab_size}): {bad[:5]}")
        if any(t >= vocab_size for t in self.params.stop_token_ids):
            raise ValueError(f"stop_token_ids {self.params.stop_token_ids} outside [0, {vocab_size})")
        return prompt


@dataclass
class Rollout:
    """One sampled response. Tensors are on the CPU."""

    prompt_ids: list[int]
    response_ids: torch.Tensor
    """int64 `[R]` (includes the stop token when finish_reason is 'stop')."""
    logprobs: torch.Tensor
    """float32 `[R]`: log-probability of each token under the distribution it was sampled from, the
    sampler's `mu` (ALGORITHM.md section 3): `log softmax(logits / T)[token]` under the sampler's weights,
    minus the log of the kept mass when top-p/top-k truncated the row (`log q`, q = p / Z renormalised over
    the kept tokens); T = 1 and no truncation when greedy. SGLang reports the untruncated `log p`, so the
    config refuses sglang with top_p < 1 or top_k > 0."""
    versions: torch.Tensor
    """int64 `[R]`: weight version that produced each token."""
    routes: torch.Tensor | None
    """`[P + R - 1, L, K]` routed experts of every position but the last (SGLang layout), uint8 for up to
    256 experts; None when capture is off or the request was refused."""
    finish_reason: FinishReason
    error: str | None = None
    """Why an 'abort' happened (bad request, engine shutdown); None otherwise."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds: queue_s (submit -> first forward), generate_s (first forward -> finished)."""

    @property
    def num_tokens(self) -> int:
        return int(self.response_ids.shape[0])


def check_version(version: object, current: int) -> int:
    """The version of a weight update, or WeightUpdateError unless it is an integer above `current`."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise WeightUpdateError(f"weight update refused: version {version!r} is not an integer")
    if version <= current:
        raise WeightUpdateError(f"weight update refused: version {version} is not above the current "
                                f"{current} (call reset() after a learner rollback)")
    return version


def aborted(prompt: list[int], error: str) -> Rollout:
    """The result of a refused request: no tokens, finish_reason 'abort', `error` set."""
    return Rollout(prompt_ids=prompt, response_ids=torch.zeros(0, dtype=torch.int64),
                   logprobs=torch.zeros(0, dtype=torch.float32), versions=torch.zeros(0, dtype=torch.int64),
                   routes=None, finish_reason="abort", error=error)


class Engine(Protocol):
    """What the sampler service uses (see the module docstring for the threading rules)."""

    @property
    def version(self) -> int:
        """Weight version in use (-1 before any weights)."""
        ...

    def generate(self, requests: Sequence[GenerateRequest]) -> list[list[Rollout]]:
        """Blocking. One list of `params.n` rollouts per request, in request order."""
        ...

    def update_weights(self, version: int, named_tensors: NamedTensors) -> None:
        """HF-named tensors (FP8 `X.weight` + `X.weight_scale_inv`, or plain floating weights). Raises
        WeightUpdateError and keeps the old weights if the set is not complete and well-shaped or if
        `version` is not above the current one."""
        ...

    def pause(self) -> None:
        """Hold generation at the next step boundary (requests stay in flight) until `resume()`."""
        ...

    def resume(self) -> None:
        ...

    def reset(self) -> None:
        """Forget the version number (the learner rolled back); the next update may carry any version."""
        ...

    def health(self) -> dict[str, Any]:
        """Cheap snapshot: version, paused, running/waiting sequences, totals."""
        ...


def make_engine(cfg: Config, *, model_cfg: ModelConfig, state: NamedTensors | None = None,
                version: int = 0, model_path: str = "", index: int = 0) -> Engine:
    """The engine of `cfg.sampler.engine` for sampler `index`.

    torch_fp8: built from `model_cfg`; `state` (HF-named tensors, e.g. `iter_hf_state(model)` or
        `iter_hf_folder(path, keep_fp8=True)`) is loaded as `version` when given.
    sglang: launches `sglang.Engine` on `sampler.sglang.model_path` or `model_path` (GPU); `model_cfg` gives
        the layout of the returned routes. A given `state` is then loaded as `version` with a weight update
        (the folder SGLang starts from may be another checkpoint, e.g. an FP8 copy of the base model).
    """
    name = cfg.sampler.engine
    if name == "torch_fp8":
        from minirl_async.engine.torch_fp8 import TorchFP8Engine

        eng = TorchFP8Engine.from_config(cfg, model_cfg, index)
        if state is not None:
            eng.update_weights(version, state)
        return eng
    if name == "sglang":
        from minirl_async.engine.sglang_engine import SGLangEngine

        if not model_path:
            raise ValueError("sampler.engine='sglang' needs a model folder: set model.path or run.sft_checkpoint")
        if state is None:
            return SGLangEngine.from_config(cfg, model_cfg, model_path, version=version, index=index)
        sgl = SGLangEngine.from_config(cfg, model_cfg, model_path, version=version - 1, index=index)
        sgl.update_weights(version, state)
        return sgl
    raise ValueError(f"sampler.engine={name!r}: choose 'torch_fp8' or 'sglang'")
