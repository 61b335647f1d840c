"""The sections of the configuration tree, one per process or concern (model, sampler, grader, learner,
algo, staleness, data, run, network), each field with its docstring. The root `Config`, its cross-field
checks and TOML loading/saving are in config.py, which re-exports every section.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Section(BaseModel):
    # inf is refused like nan: no setting here means anything with an infinite value
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)


class ModelArch(_Section):
    """Architecture of a model built from scratch (ignored when `model.path` names a checkpoint)."""

    vocab_size: int = Field(0, ge=0)
    """Vocabulary size; 0 means 'take it from the task tokenizer'."""
    hidden_size: int = Field(128, ge=8)
    """Width of the residual stream."""
    intermediate_size: int = Field(256, ge=8)
    """FFN width of dense (non-MoE) layers."""
    moe_intermediate_size: int = Field(128, ge=8)
    """FFN width of each expert."""
    num_hidden_layers: int = Field(4, ge=1)
    """Number of transformer blocks."""
    num_attention_heads: int = Field(4, ge=1)
    """Query heads."""
    num_key_value_heads: int = Field(2, ge=1)
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    head_dim: int = Field(32, ge=4)
    """Per-head width."""
    num_experts: int = Field(8, ge=1)
    """Routed experts per MoE layer."""
    num_experts_per_tok: int = Field(2, ge=1)
    """Top-k experts per token."""
    norm_topk_prob: bool = True
    """Renormalise the kept top-k router probabilities to sum to one."""
    decoder_sparse_step: int = Field(1, ge=1)
    """Every `decoder_sparse_step`-th layer is MoE (1 = all)."""
    mlp_only_layers: list[int] = Field(default_factory=list)
    """Layer indices forced to a dense MLP."""
    rms_norm_eps: float = Field(1e-6, gt=0)
    """RMSNorm epsilon."""
    rope_theta: float = Field(10000.0, gt=0)
    """Rotary embedding base."""
    max_position_embeddings: int = Field(512, ge=8)
    """Longest sequence (prompt + response) the model handles."""
    tie_word_embeddings: bool = False
    """Share the input embedding and the LM head."""


class ModelSection(_Section):
    path: str = ""
    """Local HF-format checkpoint folder (config.json + safetensors). Empty: build `arch` from scratch
    (the tiny default runs cold-start SFT first)."""
    arch: ModelArch = Field(default_factory=ModelArch)
    """Architecture used when `path` is empty."""
    init_seed: int = 0
    """Seed of the random initialisation."""
    fp8_block_size: int = Field(128, ge=1)
    """Block edge of block-FP8 quantisation (128 for real models; smaller for tiny ones)."""


class SGLangSection(_Section):
    tp_size: int = Field(1, ge=1)
    """Tensor parallel size of each SGLang engine."""
    mem_fraction_static: float = Field(0.8, gt=0, le=1)
    """Fraction of GPU memory SGLang reserves for weights and KV cache."""
    model_path: str = ""
    """HF folder SGLang loads; empty: the learner's starting checkpoint (run.sft_checkpoint or model.path).
    Set it when the learner starts from a BF16 folder: with sampler.fp8, SGLang must load a block-FP8 copy
    of the same architecture (config.json quantization_config with weight_block_size =
    [model.fp8_block_size] * 2, e.g. Qwen's -FP8 release or `save_hf(..., fp8_block_size=b)`), else it
    quantises per tensor and ignores the block scales of weight updates. Its weights are replaced by the
    learner's before the first rollout; only the layout and quantisation matter."""
    deterministic: bool = False
    """Launch SGLang with enable_deterministic_inference (batch-invariant kernels, slower). Only then does it
    honour per-request seeds, so seeded rollouts reproduce; otherwise it ignores them."""
    extra_args: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments passed to `sglang.Engine` (they override the adapter's)."""


class SamplerSection(_Section):
    engine: Literal["torch_fp8", "sglang"] = "torch_fp8"
    """Inference engine: the embedded pure-PyTorch FP8 engine, or SGLang (GPU, optional extra)."""
    num_samplers: int = Field(1, ge=1)
    """Sampler processes the launcher starts."""
    fp8: bool = True
    """Hold linear weights as block-FP8 (the real training-inference gap)."""
    max_batch_size: int = Field(64, ge=1)
    """Sequences decoded together."""
    temperature: float = Field(1.0, ge=0)
    """Sampling temperature (the learner applies the same one to its logits)."""
    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass. The embedded engine records log-probs of the truncated distribution it
    samples from; the sglang engine refuses top_p < 1 (SGLang reports untruncated log-probs)."""
    top_k: int = Field(0, ge=0)
    """Top-k sampling (0 = off); like top_p, refused with the sglang engine."""
    max_new_tokens: int = Field(64, ge=1)
    """Longest response."""
    max_context: int = Field(0, ge=0)
    """Tokens per sequence the KV cache holds: prompt + response; 0 = model.max_position_embeddings.
    The embedded engine preallocates max_batch_size x max_context cache rows: set it for real models;
    longer prompts are refused (abort), responses stop at the limit (finish_reason 'length')."""
    capture_routes: bool = True
    """Return routed experts (needed for R3 and routing metrics)."""
    interruptible: bool = False
    """Apply weight updates between decode steps (per-token versions) instead of between batches."""
    threads: int = Field(1, ge=1)
    """torch threads of each sampler process."""
    device: str = "cpu"
    """Device of the embedded engine."""
    compute_dtype: Literal["bf16", "fp32"] = "bf16"
    """Compute dtype of the embedded engine (FP8 weights are dequantised into it)."""
    sglang: SGLangSection = Field(default_factory=SGLangSection)
    """SGLang engine options."""


class GraderSection(_Section):
    name: str = "exact"
    """Built-in grader name (exact, numeric, math, code) or 'package.module:attr'."""
    kwargs: dict[str, Any] = Field(default_factory=dict)
    """Keyword arguments for the grader."""
    num_graders: int = Field(1, ge=1)
    """Grader processes the launcher starts."""
    concurrency: int = Field(8, ge=1)
    """Samples graded at once per grader process."""
    timeout_s: float = Field(10.0, gt=0)
    """Per-sample time limit."""
    failure_policy: Literal["drop_group", "zero"] = "drop_group"
    """On a grader failure: drop (and re-issue) the whole group, or score the sample 0."""


class LearnerSection(_Section):
    num_steps: int = Field(20, ge=1)
    """Global steps (weight versions) to train."""
    groups_per_step: int = Field(8, ge=1)
    """Prompt groups per global step (global batch = groups_per_step * group_size responses)."""
    minibatch_groups: int = Field(8, ge=1)
    """Prompt groups per minibatch update; N = groups_per_step / minibatch_groups updates per step."""
    lr: float = Field(1e-4, gt=0)
    """Peak AdamW learning rate."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warm-up updates."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning-rate schedule after warm-up."""
    grad_clip: float = Field(1.0, gt=0)
    """Global gradient-norm clip."""
    compute_dtype: Literal["bf16", "fp32"] = "bf16"
    """Forward/backward dtype (master weights and optimizer stay fp32)."""
    world_size: int = Field(1, ge=1)
    """Learner ranks (FSDP2); the launcher uses torchrun when > 1."""
    threads: int = Field(1, ge=1)
    """torch threads of each learner rank."""
    device: str = "cpu"
    """Learner device (cpu or cuda)."""
    checkpoint_every: int = Field(10, ge=0)
    """Save a checkpoint every this many steps (0 = only at the end)."""
    keep_last: int = Field(2, ge=1)
    """Checkpoints kept."""
    resume: bool = True
    """Resume from the newest checkpoint in the run directory if one exists. False starts afresh and moves an
    earlier run's checkpoints/ and metrics.jsonl in that directory aside (`<name>.before-<time>`)."""
    deterministic: bool = False
    """Deterministic algorithms (bit-exact resume), slower."""
    logprob_chunk: int = Field(1024, ge=1)
    """Tokens per chunk when computing log-probs and entropy (bounds memory)."""
    micro_batch_size: int = Field(0, ge=0)
    """Responses per forward/backward on each rank (gradients accumulate over the micro-batches of a
    minibatch; the result equals one big batch); 0 = the rank's whole minibatch at once."""


class AlgoSection(_Section):
    loss: Literal["minirl", "minirl_no_is", "minirl_lennorm", "grpo", "cispo", "minirl_icepop"] = "minirl"
    """Policy loss (ALGORITHM.md section 4)."""
    group_size: int = Field(8, ge=1)
    """Responses per prompt (G)."""
    eps_low: float = Field(0.2, ge=0, lt=1)
    """Lower clipping epsilon."""
    eps_high: float = Field(0.27, ge=0)
    """Upper clipping epsilon."""
    is_cap: float = Field(5.0, gt=0)
    """Truncation cap of the train-inference discrepancy ratio."""
    icepop_low: float = Field(0.5, gt=0)
    """IcePop lower mask bound."""
    icepop_high: float = Field(5.0, gt=0)
    """IcePop upper mask bound."""


class StalenessSection(_Section):
    max_staleness: int = Field(1, ge=0)
    """eta: how many versions behind the learner a rollout may be (0 = synchronous)."""
    routing_replay: Literal["auto", "r2", "r3", "none"] = "auto"
    """Routing replay mode; auto picks R2/R3 from the measured lag and KL (ALGORITHM.md section 6), R2 for a
    batch in which some response carries no sampler routes."""
    r3_min_lag: int = Field(3, ge=0)
    """Auto: choose R3 when the batch's max lag (in optimizer updates) is at least this."""
    r3_kl_threshold: float | None = Field(None, ge=0)
    """Auto: also choose R3 when the previous step's kl/train_infer_k3 exceeds this (None = off)."""
    hysteresis_steps: int = Field(1, ge=1)
    """Auto: switch only after the condition held this many steps in a row."""
    lease_s: float = Field(120.0, gt=0)
    """A granted group not returned within this many seconds is issued again."""


class SFTSection(_Section):
    steps: int = Field(600, ge=1)
    """Cold-start SFT optimizer steps."""
    batch_size: int = Field(64, ge=1)
    """Worked solutions per SFT step."""
    lr: float = Field(3e-3, gt=0)
    """SFT peak learning rate."""
    max_minutes: float = Field(3.0, gt=0)
    """Stop SFT after this much wall time even if steps remain."""
    threads: int = Field(1, ge=1)
    """torch threads of SFT (2 halves the time on an idle machine; on a busy one extra threads only wait)."""
    slip: float = Field(0.0, ge=0, lt=1)
    """Probability of a deliberate slip per worked-solution step (imperfect demonstrations): the cold start
    then samples slips at about this rate, which RL can remove. 0 = clean solutions."""


class DataSection(_Section):
    task: str = "arith"
    """Synthetic task family, or 'jsonl' to read `jsonl_path`."""
    difficulty: int = Field(2, ge=1)
    """Difficulty knob of the synthetic task."""
    jsonl_path: str = ""
    """Prompt dataset, one JSON object per line (used when task = 'jsonl')."""
    eval_jsonl_path: str = ""
    """Held-out prompt dataset for eval when task = 'jsonl' (synthetic tasks hash-partition their own)."""
    bad_line_policy: Literal["skip", "fail"] = "skip"
    """A malformed JSONL line is reported with its number and skipped, or fails the load."""
    tokenizer_path: str = ""
    """tokenizer.json to use; empty: the checkpoint's, or the task's built-in tokenizer."""
    seed: int = 0
    """Seed of the prompt stream."""
    num_eval: int = Field(256, ge=1)
    """Held-out prompts used by eval."""
    eval_samples: int = Field(4, ge=1)
    """Sampled responses per held-out prompt in eval (k of pass@k)."""
    sft: SFTSection = Field(default_factory=SFTSection)
    """Cold-start SFT settings."""


class RunSection(_Section):
    dir: str = Field("runs/latest", min_length=1)
    """Run directory (config.toml, metrics.jsonl, events.log, checkpoints/, report/)."""
    seed: int = 0
    """Global seed."""
    sft_checkpoint: str = ""
    """Cold-start checkpoint to start RL from; empty: run SFT first (or use model.path)."""
    progress: bool = True
    """Show live progress."""
    max_restarts: int = Field(3, ge=0)
    """Restarts of a crashed service before the launcher gives up."""
    eval_after: bool = True
    """Evaluate the final policy at the end of `minirl-async run`."""
    fake_compute: bool = False
    """Replace the sampler engine and the trainer by fakes of the same interfaces (instant, random tokens,
    no model): for tests and benchmarks of the pipeline itself. Never for real runs."""
    fake_step_s: float = Field(0.05, ge=0)
    """With fake_compute: seconds one fake train step or one fake generation batch takes."""
    ready_timeout_s: float = Field(180.0, gt=0)
    """The launcher gives up when a service is not ready within this many seconds."""
    stop_grace_s: float = Field(10.0, gt=0)
    """On stop, seconds between SIGTERM and SIGKILL of a service's process group."""


class NetworkSection(_Section):
    work_addr: str = "tcp://127.0.0.1:5555"
    """Learner ROUTER: WorkRequest/WorkGrant, WeightsRequest, Heartbeat."""
    weights_addr: str = "tcp://127.0.0.1:5556"
    """Learner PUB: WeightUpdate chunks."""
    rollout_addr: str = "tcp://127.0.0.1:5557"
    """Grader PULL (bound by the first grader... or a fan-in): RolloutGroup from samplers."""
    scored_addr: str = "tcp://127.0.0.1:5558"
    """Learner PULL: ScoredGroup from graders."""
    max_msg_bytes: int = Field(1 << 30, ge=1024)
    """zmq MAXMSGSIZE on every socket; larger messages are refused."""
    hwm: int = Field(1000, ge=1)
    """Default high-water mark (messages)."""
    weight_chunk_mb: float = Field(16.0, gt=0)
    """Size of one safetensors weight chunk. Keep it <= 16: glibc serves blocks over ~32 MB with fresh mmap
    pages, and first-touch page faults then halve or quarter loopback throughput (bench weightsync)."""
    weights_hwm: int = Field(8, ge=1)
    """Weight chunks queued per subscriber before the publisher waits (chunks are never dropped)."""
    weight_keep_blobs: bool = False
    """Keep the last published chunks for late joiners (one serialised copy of the weights) instead of
    re-serialising them from the live state between steps."""
    curve_server_key: str = ""
    """CurveZMQ server secret key file (empty: no encryption)."""
    curve_client_key: str = ""
    """CurveZMQ client secret key file."""
    curve_server_public: str = ""
    """CurveZMQ server public key file (clients)."""
    curve_allowed_clients: str = ""
    """Folder of client public key files (NAME.key) a CURVE server accepts (empty: any client with the
    server key)."""
    heartbeat_s: float = Field(2.0, gt=0)
    """Heartbeat period."""
