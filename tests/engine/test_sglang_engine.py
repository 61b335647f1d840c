"""SGLang adapter: contract tests against fixtures in SGLang's response format (fixtures/*.json cite the
source files they follow), fakes of `sglang.Engine` for the call sequence of weight updates (one shaped like
the 0.5.23 Engine, behind a stub `sglang` package), launch arguments and folder checks of `from_config`, and a
GPU test against the real thing (skipped without a GPU or sglang).

    pytest tests/engine/test_sglang_engine.py -q
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import sys
import threading
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from minirl_async.config import Config
from minirl_async.engine.base import GenerateRequest, SamplingParams, WeightUpdateError
from minirl_async.engine.sglang_engine import SGLangEngine, SGLangFormatError, fp8_wire_tensors, parse_output
from minirl_async.models.config import ModelConfig
from minirl_async.models.fp8 import FP8_DTYPE, dequantize_block_fp8, quantize_state
from minirl_async.models.hf_io import iter_hf_state, save_hf
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM

FIXTURES = Path(__file__).parent / "fixtures"
# P prompt, R response, L layers, K top-k


def tiny() -> ModelConfig:
    return ModelConfig(vocab_size=48, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                       num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                       num_experts=8, num_experts_per_tok=2, mlp_only_layers=[1], max_position_embeddings=40)


def state(seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    return dict(iter_hf_state(Qwen3MoeForCausalLM(tiny())))


OK = json.loads((FIXTURES / "sglang_generate_ok.json").read_text())
BAD = json.loads((FIXTURES / "sglang_generate_malformed.json").read_text())["cases"]


def test_parse_documented_outputs() -> None:
    cfg = tiny()
    r0, r1, r2 = (parse_output(o, p, cfg, version=3, want_routes=True) for o, p in zip(OK["outputs"], OK["prompts"]))
    assert r0.finish_reason == "stop" and r0.response_ids.tolist() == [7, 9, 11]
    assert torch.equal(r0.logprobs, torch.tensor([-0.5, -1.25, -0.125]))
    assert r0.versions.tolist() == [3, 3, 3]                      # weight_version "default": ours
    assert r1.finish_reason == "length" and r1.versions.tolist() == [7] * 4   # numeric weight_version wins
    for r, full in ((r0, OK["routes_all_layers"][0]), (r1, OK["routes_all_layers"][1])):
        assert r.routes is not None and r.routes.dtype == torch.uint8
        assert tuple(r.routes.shape) == (len(r.prompt_ids) + r.num_tokens - 1, 2, 2)
        assert r.routes.tolist() == [[row[0], row[2]] for row in full]   # dense layer 1 dropped
    assert r2.finish_reason == "abort" and r2.num_tokens == 0 and r2.error == "Abort before prefill"
    assert r2.routes is None
    no_routes = parse_output(OK["outputs"][0], OK["prompts"][0], cfg, version=0, want_routes=False)
    assert no_routes.routes is None


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_outputs_raise_clear_errors(case: str) -> None:
    with pytest.raises(SGLangFormatError, match=BAD[case]["expect"].replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        parse_output(BAD[case]["output"], [1, 2, 3], tiny(), version=0, want_routes=True)


def fixture_outputs(input_ids: list[list[int]], sampling_params: list[dict[str, Any]], return_logprob: bool,
                    weight_version: str) -> list[dict[str, Any]]:
    """SGLang's answer from the fixture, one output per input."""
    assert return_logprob and len(input_ids) == len(sampling_params)
    by_prompt = {tuple(p): o for p, o in zip(OK["prompts"], OK["outputs"])}
    outs = []
    for ids, sp in zip(input_ids, sampling_params):
        assert sp["n"] == 1
        o = json.loads(json.dumps(by_prompt[tuple(ids)]))
        o["meta_info"]["weight_version"] = weight_version
        outs.append(o)
    return outs


class FakeSGLang:
    """Stands in for `sglang.Engine`: records calls, answers from the fixture, enforces SGLang's rules
    (no flush while requests run, update only inside a begin/end session when the session API exists).
    Like the real 0.5.x Engine it has no pause/continue/update_weight_version methods: those are coroutines
    of `tokenizer_manager` (TokenizerManager0523 below) run on `loop`, so tests that reach them need the
    `sglang_stub` fixture (their request classes come from `sglang.srt.managers.io_struct`)."""

    def __init__(self, session_api: bool = True, fail_update: bool = False):
        self.loop = asyncio.new_event_loop()
        FAKE_LOOPS.append(self.loop)
        self.tokenizer_manager = TokenizerManager0523(self)
        self.calls: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.running = 0
        self.in_session = False
        self.session_api = session_api
        self.fail_update = fail_update
        self.weight_version = "default"
        self.sampling_params: list[dict[str, Any]] = []
        if not session_api:
            self.begin_weight_update = None  # type: ignore[assignment]
            self.end_weight_update = None  # type: ignore[assignment]

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict[str, Any]], return_logprob: bool,
                 return_routed_experts: bool) -> list[dict[str, Any]]:
        self.calls.append("generate")
        self.sampling_params = sampling_params
        return fixture_outputs(input_ids, sampling_params, return_logprob, self.weight_version)

    def begin_weight_update(self) -> tuple[bool, str]:
        self.calls.append("begin")
        self.in_session = True
        return True, ""

    def end_weight_update(self) -> tuple[bool, str]:
        self.calls.append("end")
        self.in_session = False
        return True, ""

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]],
                                   flush_cache: bool = True) -> tuple[bool, str]:
        self.calls.append("update")
        if self.session_api:
            assert self.in_session, "update outside begin/end"
        if self.fail_update:
            return False, "Failed to update parameter online: injected"
        self.tensors.update(named_tensors)
        return True, "Succeeded to update parameter online."

    def flush_cache(self) -> bool:
        self.calls.append("flush")
        return self.running == 0   # SGLang: a flush with requests in the running batch fails


FAKE_LOOPS: list[asyncio.AbstractEventLoop] = []


@pytest.fixture(autouse=True)
def _close_fake_loops() -> Iterator[None]:
    yield
    while FAKE_LOOPS:
        FAKE_LOOPS.pop().close()


def test_generate_maps_requests_and_outputs() -> None:
    fake = FakeSGLang()
    eng = SGLangEngine(fake, tiny(), version=0)     # context 40 (max_position_embeddings)
    reqs = [GenerateRequest([1, 2, 3], SamplingParams(temperature=0.7, top_k=0, max_new_tokens=8, n=2, seed=5,
                                                       stop_token_ids=(11,))),
            GenerateRequest([], SamplingParams()),
            GenerateRequest([4, 5], SamplingParams(max_new_tokens=100)),
            GenerateRequest([4, 5], SamplingParams(top_p=0.9)),
            GenerateRequest([4, 5], SamplingParams(top_k=4)),
            GenerateRequest(list(range(1, 40)), SamplingParams())]    # 39 tokens: SGLang 0.5.10 needs P + 1 < 40
    out = eng.generate(reqs)
    assert [len(r) for r in out] == [2, 1, 1, 1, 1, 1]
    assert out[1][0].finish_reason == "abort" and "empty prompt" in (out[1][0].error or "")
    assert out[0][0].response_ids.tolist() == [7, 9, 11] and out[2][0].finish_reason == "length"
    assert out[0][0].routes is not None and out[0][0].routes.shape == (5, 2, 2)
    for r in (out[3][0], out[4][0]):                                # SGLang's logprobs are untruncated
        assert r.finish_reason == "abort" and "untruncated log-probs" in (r.error or "")
    assert out[5][0].finish_reason == "abort" and "at most 38 tokens" in (out[5][0].error or "")
    sent = fake.sampling_params
    assert len(sent) == 3 and all(sp["ignore_eos"] is True and sp["top_p"] == 1.0 and sp["top_k"] == -1
                                  and sp["n"] == 1 for sp in sent)   # only stop_token_ids stop a sample
    assert [sp["max_new_tokens"] for sp in sent] == [8, 8, 37]      # 2 + 37 = 39 < 40
    assert [sp["stop_token_ids"] for sp in sent] == [[11], [11], []]
    seeds = [sp["sampling_seed"] for sp in sent]
    assert seeds[:2] == [5, 6]                                     # request seed + j
    # An unseeded request still gets a seed: with deterministic inference SGLang would otherwise give every
    # unseeded sample the same one.
    eng.generate([GenerateRequest([4, 5], SamplingParams(n=2))])
    a, b = (sp["sampling_seed"] for sp in fake.sampling_params)
    assert isinstance(a, int) and b == a + 1 and 0 <= a < 2 ** 62


def test_weight_update_sequence_with_fp8_weights_and_scales(sglang_stub: list[Engine0523]) -> None:
    fake = FakeSGLang()
    fake.running = 2
    eng = SGLangEngine(fake, tiny(), version=0, fp8=True, fp8_block=8)
    new = state(1)
    eng.update_weights(1, new)
    assert fake.calls == ["pause:retract", "begin", "update", "end", "flush", "version:1", "continue"]
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    assert fake.tensors[name].dtype == FP8_DTYPE and fake.tensors[name + "_scale_inv"].dtype == torch.float32
    deq = dequantize_block_fp8(fake.tensors[name], fake.tensors[name + "_scale_inv"], 8)
    assert torch.allclose(deq, new[name], rtol=2 ** -4, atol=2 ** -10 * new[name].abs().max().item())
    assert fake.tensors["model.layers.0.mlp.gate.weight"].dtype == torch.float32   # router never FP8
    assert "model.layers.1.mlp.down_proj.weight_scale_inv" in fake.tensors         # dense MLP is FP8
    assert eng.version == 1
    fake.calls.clear()
    eng.update_weights(2, quantize_state(state(2).items(), 8))     # already-FP8 input passes through
    assert "update" in fake.calls and eng.version == 2
    out = eng.generate([GenerateRequest([4, 5], SamplingParams())])
    assert out[0][0].versions.tolist() == [2] * 4                  # SGLang now reports weight_version "2"


def test_weight_update_without_session_api_and_refusals(sglang_stub: list[Engine0523]) -> None:
    fake = FakeSGLang(session_api=False)
    eng = SGLangEngine(fake, tiny(), version=4, fp8=True, fp8_block=8)
    with pytest.raises(WeightUpdateError, match="not above"):
        eng.update_weights(4, state())
    bad = state()
    bad.pop("model.norm.weight")
    with pytest.raises(WeightUpdateError, match="missing"):
        eng.update_weights(5, bad)
    assert fake.calls == []                                        # nothing reached SGLang
    eng.update_weights(5, state())
    assert fake.calls == ["pause:retract", "update", "flush", "version:5", "continue"]


def test_failed_sglang_update_blocks_generation_until_a_good_one(sglang_stub: list[Engine0523]) -> None:
    fake = FakeSGLang(fail_update=True)
    eng = SGLangEngine(fake, tiny(), version=0, fp8=True, fp8_block=8)
    with pytest.raises(WeightUpdateError, match="injected"):
        eng.update_weights(1, state())
    assert fake.calls[-2:] == ["end", "continue"] and eng.version == 0   # session closed, generation resumed
    with pytest.raises(RuntimeError, match="failed weight update"):
        eng.generate([GenerateRequest([1, 2, 3], SamplingParams())])
    fake.fail_update = False
    eng.update_weights(1, state())
    assert eng.generate([GenerateRequest([1, 2, 3], SamplingParams())])[0][0].num_tokens == 3


def test_fp8_wire_rejects_scale_of_wrong_shape() -> None:
    items = dict(quantize_state(state().items(), 8))
    items["model.layers.0.self_attn.q_proj.weight_scale_inv"] = torch.ones(1, 1)
    with pytest.raises(WeightUpdateError, match="scale_inv has shape"):
        fp8_wire_tensors(tiny(), items, 8, fp8=True)


@pytest.mark.gpu
def test_real_sglang_engine_roundtrip(tmp_path: Path) -> None:
    """On a GPU with sglang installed: launch on a tiny FP8 checkpoint, generate with routes, update weights."""
    pytest.importorskip("sglang")
    from minirl_async.config import Config
    from minirl_async.models.hf_io import save_hf

    cfg = Config()
    cfg.sampler.engine = "sglang"
    cfg.model.fp8_block_size = 8
    mcfg = tiny()
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(mcfg).to(torch.bfloat16)
    save_hf(model, mcfg, tmp_path, fp8_block_size=8)
    eng = SGLangEngine.from_config(cfg, mcfg, str(tmp_path))
    try:
        out = eng.generate([GenerateRequest([1, 2, 3], SamplingParams(max_new_tokens=5, n=2, seed=0))])
        r = out[0][0]
        assert r.num_tokens >= 1 and r.routes is not None and r.routes.shape[0] == 3 + r.num_tokens - 1
        eng.update_weights(1, iter_hf_state(model))
        assert eng.version == 1
    finally:
        eng.engine.shutdown()


@pytest.mark.parametrize("env, temperatures, warns", [
    ("1", (0.7, 0.5), True),          # T=1 logprobs against a learner using logits / 0.7: warn, once
    ("True", (0.7,), True),
    ("yes", (0.7,), False),           # SGLang's get_bool_env_var: only 1/true are true
    ("1", (1.0, 0.0), False),         # T = 1 and greedy (learner uses T = 1) agree with SGLang's values
    ("0", (0.7,), False),
    (None, (0.7,), False),
])
def test_warns_once_when_original_logprob_env_meets_a_temperature(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, env: str | None,
        temperatures: tuple[float, ...], warns: bool) -> None:
    if env is None:
        monkeypatch.delenv("SGLANG_RETURN_ORIGINAL_LOGPROB", raising=False)
    else:
        monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", env)
    eng = SGLangEngine(FakeSGLang(), tiny(), version=0)
    with caplog.at_level(logging.WARNING, logger="minirl_async.engine.sglang_engine"):
        for _ in range(2):
            eng.generate([GenerateRequest([1, 2, 3], SamplingParams(temperature=t, max_new_tokens=4))
                          for t in temperatures])
    hits = [r for r in caplog.records if "SGLANG_RETURN_ORIGINAL_LOGPROB" in r.getMessage()]
    assert len(hits) == (1 if warns else 0)
    if warns:
        assert hits[0].levelno == logging.WARNING and "temperature 0.7" in hits[0].getMessage()


# ------------------------------------------------------------------------------------------------------------
# A fake shaped like the real sglang 0.5.23 Engine, behind a stub `sglang` package


@dataclasses.dataclass(kw_only=True)
class PauseGenerationReqInput:          # sglang/srt/managers/io_struct.py (0.5.23), fields we use
    mode: str = "abort"


@dataclasses.dataclass(kw_only=True)
class ContinueGenerationReqInput:
    torch_empty_cache: bool = True


@dataclasses.dataclass(kw_only=True)
class UpdateWeightVersionReqInput:
    new_version: str
    abort_all_requests: bool = True


class TokenizerManager0523:
    """Where 0.5.23 keeps pause/continue/update_weight_version: coroutines taking io_struct request objects."""

    def __init__(self, engine: Engine0523):
        self.engine = engine

    async def pause_generation(self, obj: PauseGenerationReqInput) -> None:
        assert isinstance(obj, PauseGenerationReqInput)
        self.engine.calls.append(f"pause:{obj.mode}")
        if obj.mode == "retract":
            self.engine.running = 0          # running requests go back to the waiting queue

    async def continue_generation(self, obj: ContinueGenerationReqInput) -> None:
        assert isinstance(obj, ContinueGenerationReqInput)
        self.engine.calls.append("continue")
        hold = getattr(self.engine, "hold", None)
        if hold is not None:
            hold.set()

    async def update_weight_version(self, obj: UpdateWeightVersionReqInput) -> None:
        assert isinstance(obj, UpdateWeightVersionReqInput)
        self.engine.calls.append(f"version:{obj.new_version}")
        self.engine.weight_version = obj.new_version


class Engine0523:
    """`sglang.Engine` of 0.5.23 as far as the adapter sees it: only generate, flush_cache and the weight-update
    session methods on the engine (entrypoints/engine.py); the rest through `tokenizer_manager` on `loop`.
    Session rules and messages follow managers/scheduler_components/weight_updater.py."""

    def __init__(self, **kwargs: Any):
        self.kwargs = kwargs                 # what sglang.Engine(**kw) received
        self.loop = asyncio.new_event_loop()
        self.tokenizer_manager = TokenizerManager0523(self)
        self.calls: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.running = 0
        self.session_open = False
        self.raise_in_update = False
        self.weight_version = "default"
        self.refuse: set[tuple[int, ...]] = set()   # prompts aborted with status 400
        self.down = False                            # every request fails with a server error
        self.hold: asyncio.Event | None = None       # generate waits on the loop until this is set
        self.generating = threading.Event()

    def generate(self, input_ids: list[list[int]], sampling_params: list[dict[str, Any]],
                 return_logprob: bool = False, return_routed_experts: bool = False,
                 **_: Any) -> list[dict[str, Any]]:
        """Like sglang.Engine.generate: runs the request on `loop`; a non-streaming abort with an error status
        raises out of the whole batch (tokenizer_manager._handle_abort_finish_reason)."""
        self.calls.append("generate")

        async def serve() -> None:
            self.generating.set()
            if self.hold is not None:
                await self.hold.wait()
            if self.down:
                raise RuntimeError("HTTPException 503: scheduler is not responding")
            if any(tuple(ids) in self.refuse for ids in input_ids):
                raise ValueError("The input (2 tokens) is longer than the model's context length")

        self.loop.run_until_complete(serve())
        return fixture_outputs(input_ids, sampling_params, return_logprob, self.weight_version)

    def begin_weight_update(self, selector: str = "all") -> tuple[bool, str]:
        self.calls.append("begin")
        if self.session_open:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session_open = True
        return True, "Success"

    def end_weight_update(self) -> tuple[bool, str]:
        self.calls.append("end")
        if not self.session_open:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session_open = False
        return True, "Success"

    def update_weights_from_tensor(self, named_tensors: list[tuple[str, torch.Tensor]], load_format: str | None = None,
                                   flush_cache: bool = True) -> tuple[bool, str]:
        self.calls.append("update")
        if not self.session_open:
            return False, "update_weights_from_tensor must run between begin_weight_update() and end_weight_update()"
        if self.raise_in_update:
            raise RuntimeError("CUDA error: injected")
        self.tensors.update(named_tensors)
        return True, "Success"

    def flush_cache(self) -> Any:
        self.calls.append("flush")
        return types.SimpleNamespace(success=self.running == 0, message="")   # FlushCacheReqOutput


@pytest.fixture
def sglang_stub(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Engine0523]]:
    """Install a stub `sglang` package (Engine = Engine0523, srt.managers.io_struct with the request classes);
    yields the engines `sglang.Engine(...)` built."""
    built: list[Engine0523] = []

    def engine(**kwargs: Any) -> Engine0523:
        built.append(Engine0523(**kwargs))
        return built[-1]

    io_struct = types.ModuleType("sglang.srt.managers.io_struct")
    for cls in (PauseGenerationReqInput, ContinueGenerationReqInput, UpdateWeightVersionReqInput):
        setattr(io_struct, cls.__name__, cls)
    mods = {name: types.ModuleType(name) for name in ("sglang", "sglang.srt", "sglang.srt.managers")}
    mods["sglang"].Engine = engine  # type: ignore[attr-defined]
    mods["sglang.srt.managers"].io_struct = io_struct  # type: ignore[attr-defined]
    for name, mod in {**mods, "sglang.srt.managers.io_struct": io_struct}.items():
        monkeypatch.setitem(sys.modules, name, mod)
    yield built
    for e in built:
        e.loop.close()


def launch(built: list[Engine0523], **kw: Any) -> tuple[SGLangEngine, Engine0523]:
    import sglang  # the stub

    eng = SGLangEngine(sglang.Engine(), tiny(), version=0, fp8=True, fp8_block=8, **kw)
    return eng, built[-1]


def test_real_shaped_engine_update_sequence(sglang_stub: list[Engine0523]) -> None:
    eng, fake = launch(sglang_stub)
    fake.running = 2
    eng.update_weights(1, state(1))
    assert fake.calls == ["pause:retract", "begin", "update", "end", "flush", "version:1", "continue"]
    assert fake.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    assert eng.generate([GenerateRequest([4, 5], SamplingParams())])[0][0].versions.tolist() == [1] * 4
    fake.calls.clear()
    eng.pause()
    eng.resume()
    assert fake.calls == ["pause:in_place", "continue"]


def test_session_left_open_is_ended_and_begun_again(sglang_stub: list[Engine0523],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    eng, fake = launch(sglang_stub)
    fake.session_open = True            # e.g. a sampler that died inside an update
    with caplog.at_level(logging.WARNING, logger="minirl_async.engine.sglang_engine"):
        eng.update_weights(1, state())
    assert fake.calls[:5] == ["pause:retract", "begin", "end", "begin", "update"]
    assert eng.version == 1 and not fake.session_open and "already open" in caplog.text


def test_exception_inside_update_closes_the_session_and_blocks_generation(sglang_stub: list[Engine0523]) -> None:
    eng, fake = launch(sglang_stub)
    fake.raise_in_update = True
    with pytest.raises(RuntimeError, match="injected"):
        eng.update_weights(1, state())
    assert not fake.session_open and fake.calls[-2:] == ["end", "continue"] and eng.version == 0
    with pytest.raises(RuntimeError, match="did not complete"):
        eng.generate([GenerateRequest([1, 2, 3], SamplingParams())])
    fake.raise_in_update = False
    eng.update_weights(1, state())      # the next begin is not refused: the session was closed
    assert eng.version == 1 and eng.generate([GenerateRequest([1, 2, 3], SamplingParams())])[0][0].num_tokens == 3


@pytest.fixture
def folders(tmp_path: Path) -> dict[str, Path]:
    """Tiny HF folders written by save_hf: BF16 (no quantization_config) and block-FP8 with block 8."""
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(tiny())
    return {"bf16": save_hf(model, tiny(), tmp_path / "bf16", dtype=torch.bfloat16),
            "fp8": save_hf(model, tiny(), tmp_path / "fp8", fp8_block_size=8)}


def test_from_config_launch_arguments(sglang_stub: list[Engine0523], folders: dict[str, Path]) -> None:
    cfg = Config()
    cfg.run.seed = 3
    cfg.model.fp8_block_size = 8
    cfg.sampler.max_context = 32
    cfg.sampler.sglang.deterministic = True
    cfg.sampler.sglang.model_path = str(folders["fp8"])       # the learner starts from the BF16 folder
    eng = SGLangEngine.from_config(cfg, tiny(), str(folders["bf16"]), version=0, index=2)
    assert sglang_stub[-1].kwargs == {
        "model_path": str(folders["fp8"]), "tp_size": 1, "mem_fraction_static": 0.8,
        "enable_return_routed_experts": True, "random_seed": 3002, "skip_tokenizer_init": True,
        "enable_deterministic_inference": True, "context_length": 32, "quantization": "fp8"}
    assert eng.max_context == 32 and eng.fp8_block == 8
    # BF16 sampler: no quantization, no context_length; the learner's folder; extra_args override ours.
    cfg.sampler.fp8 = False
    cfg.sampler.max_context = 0
    cfg.sampler.sglang.model_path = ""
    cfg.sampler.sglang.extra_args = {"mem_fraction_static": 0.5, "attention_backend": "fa3"}
    SGLangEngine.from_config(cfg, tiny(), str(folders["bf16"]))
    kw = sglang_stub[-1].kwargs
    assert "quantization" not in kw and "context_length" not in kw and kw["model_path"] == str(folders["bf16"])
    assert kw["random_seed"] == 3000 and kw["enable_deterministic_inference"] is True
    assert kw["mem_fraction_static"] == 0.5 and kw["attention_backend"] == "fa3"


@pytest.mark.parametrize("folder, fp8, block, arch, expect", [
    ("bf16", True, 8, {}, r"not a block-FP8 checkpoint .*sampler.sglang.model_path.*fp8_block_size=8"),
    ("fp8", True, 16, {}, r"weight_block_size \[8, 8\] but model.fp8_block_size = 16"),
    ("fp8", False, 8, {}, r"block-FP8 checkpoint but sampler.fp8 = false"),
    ("fp8", True, 8, {"num_experts": 16}, r"num_experts 8 != 16"),
])
def test_from_config_refuses_a_folder_sglang_would_load_differently(
        sglang_stub: list[Engine0523], folders: dict[str, Path], folder: str, fp8: bool, block: int,
        arch: dict[str, Any], expect: str) -> None:
    cfg = Config()
    cfg.sampler.fp8 = fp8
    cfg.model.fp8_block_size = block
    with pytest.raises(ValueError, match=expect):
        SGLangEngine.from_config(cfg, dataclasses.replace(tiny(), **arch), str(folders[folder]))
    assert sglang_stub == []            # refused before launching SGLang


def test_make_engine_loads_a_given_state_into_sglang(sglang_stub: list[Engine0523], folders: dict[str, Path]) -> None:
    # eval of a checkpoint through SGLang: SGLang starts from its own folder (an FP8 copy of the base model),
    # the checkpoint's weights then arrive as an update, under the version asked for; sampler i seeds i
    from minirl_async.engine.base import make_engine

    cfg = Config()
    cfg.sampler.engine = "sglang"
    cfg.model.fp8_block_size = 8
    cfg.sampler.sglang.model_path = str(folders["fp8"])
    eng = make_engine(cfg, model_cfg=tiny(), state=state(2), version=0, model_path=str(folders["bf16"]), index=1)
    fake = sglang_stub[-1]
    assert eng.version == 0 and "update" in fake.calls and fake.kwargs["random_seed"] == cfg.run.seed * 1000 + 1
    assert fake.tensors["model.layers.0.self_attn.q_proj.weight"].dtype == FP8_DTYPE
    fresh = make_engine(cfg, model_cfg=tiny(), version=-1, model_path=str(folders["bf16"]))   # a sampler at start
    assert fresh.version == -1 and "update" not in sglang_stub[-1].calls


def test_pause_and_resume_while_generate_runs_the_loop(sglang_stub: list[Engine0523]) -> None:
    # sglang.Engine.generate runs its loop with run_until_complete: pause() from another thread must submit to
    # that running loop (run_until_complete there raised "This event loop is already running").
    eng, fake = launch(sglang_stub)
    fake.hold = asyncio.Event()
    got: list[Any] = []
    worker = threading.Thread(target=lambda: got.append(eng.generate([GenerateRequest([4, 5], SamplingParams())])))
    worker.start()
    assert fake.generating.wait(10)
    eng.pause()
    assert eng.health()["paused"] and worker.is_alive()
    eng.resume()                        # continue_generation releases the held request
    worker.join(10)
    assert not worker.is_alive() and got[0][0][0].num_tokens == 4
    assert fake.calls == ["generate", "pause:in_place", "continue"]


def test_concurrent_updates_never_move_the_version_back(sglang_stub: list[Engine0523],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    # Update 2 passes the first version check, then waits for the lock while update 3 lands: it must be refused
    # under the lock, not applied over version 3.
    import minirl_async.engine.sglang_engine as mod

    eng, fake = launch(sglang_stub)
    prepared = threading.Event()
    wire = mod.fp8_wire_tensors

    def wire_then_signal(*a: Any, **k: Any) -> Any:
        out = wire(*a, **k)
        prepared.set()
        return out

    monkeypatch.setattr(mod, "fp8_wire_tensors", wire_then_signal)
    errors: list[Exception] = []

    def update2() -> None:
        try:
            eng.update_weights(2, state(2))
        except WeightUpdateError as e:
            errors.append(e)

    with eng._lock:
        late = threading.Thread(target=update2)
        late.start()
        assert prepared.wait(30)
        eng._version = 3                 # what update 3 leaves behind (it held the lock meanwhile)
        fake.weight_version = "3"
    late.join(30)
    assert len(errors) == 1 and "not above the current 3" in str(errors[0])
    assert eng.version == 3 and fake.weight_version == "3" and "update" not in fake.calls


def test_fp8_input_is_dequantised_for_a_bf16_sglang(sglang_stub: list[Engine0523]) -> None:
    import sglang  # the stub

    eng = SGLangEngine(sglang.Engine(), tiny(), version=0, fp8=False, fp8_block=8)
    fake = sglang_stub[-1]
    q = dict(quantize_state(state(1).items(), 8))
    eng.update_weights(1, q)
    name = "model.layers.0.self_attn.q_proj.weight"
    assert not any(n.endswith("_scale_inv") for n in fake.tensors)   # a BF16 model would skip them
    assert fake.tensors[name].dtype == torch.bfloat16
    assert torch.equal(fake.tensors[name], dequantize_block_fp8(q[name], q[name + "_scale_inv"], 8, torch.bfloat16))


def test_a_request_sglang_refuses_does_not_cost_the_batch(sglang_stub: list[Engine0523],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    eng, fake = launch(sglang_stub)
    fake.refuse = {(4, 5)}
    with caplog.at_level(logging.WARNING, logger="minirl_async.engine.sglang_engine"):
        out = eng.generate([GenerateRequest([1, 2, 3], SamplingParams(n=2)), GenerateRequest([4, 5], SamplingParams())])
    assert [r.response_ids.tolist() for r in out[0]] == [[7, 9, 11]] * 2
    assert out[1][0].finish_reason == "abort" and "context length" in (out[1][0].error or "")
    assert fake.calls == ["generate"] * 4 and "one by one" in caplog.text   # the batch, then each request
    assert eng.health()["refused_requests"] == 1
    fake.refuse, fake.down = set(), True    # a failing server is an engine error, not request aborts
    with pytest.raises(RuntimeError, match="503"):
        eng.generate([GenerateRequest([1, 2, 3], SamplingParams())])
