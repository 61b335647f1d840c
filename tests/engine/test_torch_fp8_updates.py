"""The embedded engine's weight updates: atomic at a version boundary or, interruptible, between decode steps
with per-token versions; bad updates refused with the old weights kept; FP8 update forms; pause/resume;
reset. Float64 with FP8 off unless the test is about FP8.

    pytest tests/engine/test_torch_fp8_updates.py -q
"""

from __future__ import annotations

import threading
import time

import pytest
import torch
from engine_testkit import PROMPTS, engine64, model64, reference_decode, tiny

from minirl_async.engine.base import GenerateRequest, SamplingParams, WeightUpdateError
from minirl_async.engine.torch_fp8 import TorchFP8Engine
from minirl_async.models.fp8 import quantize_block_fp8, quantize_state
from minirl_async.models.hf_io import iter_hf_state
from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM


def test_update_does_not_alias_the_callers_tensors() -> None:
    """After update_weights the engine owns its weights: changing the model it was loaded from (in place, as
    an optimizer step does) changes nothing the engine serves. Without FP8 every tensor would otherwise be
    the caller's (a cast to the same dtype returns its input); with FP8 the norms, embeddings and lm_head."""
    cfg = tiny()
    req = [GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=6)) for p in PROMPTS]
    for fp8, dtype in ((False, torch.float64), (True, torch.float32)):
        model = model64(cfg, seed=4).to(dtype)
        eng = TorchFP8Engine(cfg, fp8=fp8, fp8_block=8, dtype=dtype)
        eng.update_weights(0, iter_hf_state(model))
        before = eng.generate(req)
        ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
        shared = [n for n, p in eng.model.named_parameters() if p.untyped_storage().data_ptr() in ptrs]
        assert not shared, (fp8, shared[:5])
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-1.5)
        after = eng.generate(req)
        for a, b in zip(before, after):
            assert torch.equal(a[0].response_ids, b[0].response_ids), fp8
            assert torch.equal(a[0].logprobs, b[0].logprobs), fp8


def test_bad_weight_updates_refused_and_old_weights_kept() -> None:
    cfg = tiny()
    model = model64(cfg)
    eng = engine64(cfg, model)
    req = [GenerateRequest([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=8))]
    before = eng.generate(req)[0][0].response_ids.tolist()
    good = dict(iter_hf_state(model64(cfg, seed=5)))
    name = "model.layers.0.self_attn.q_proj.weight"
    cases = {
        "missing": {k: v for k, v in good.items() if k != name},
        "unexpected": {**good, "model.layers.9.foo.weight": torch.zeros(2)},
        "has shape": {**good, name: good[name][:, :-1]},
        "non-finite": {**good, name: torch.full_like(good[name], float("nan"))},
        "is float8 but": {**good, name: good[name].to(torch.float8_e4m3fn)},
        "scale_inv is a list": {**good, name: good[name].to(torch.float8_e4m3fn), name + "_scale_inv": [1.0]},
        "float8_e4m3fn, expected": {**good, **{k: v.to(torch.float8_e4m3fn) if k.endswith("scale_inv") else v
                                               for k, v in zip((name, name + "_scale_inv"),
                                                               quantize_block_fp8(good[name], eng.fp8_block))}},
    }
    for needle, state in cases.items():
        with pytest.raises(WeightUpdateError, match=needle):
            eng.update_weights(1, state)
    for v, needle in ((0, "not above"), (-3, "not above"), (1.5, "not an integer"), (True, "not an integer")):
        with pytest.raises(WeightUpdateError, match=needle):
            eng.update_weights(v, good)  # type: ignore[arg-type]
    assert eng.version == 0 and eng.health()["refused_updates"] == len(cases) + 4
    assert eng.generate(req)[0][0].response_ids.tolist() == before
    eng.update_weights(1, good)  # a good one still goes through, and changes the output
    assert eng.version == 1 and eng.generate(req)[0][0].response_ids.tolist() != before
    eng.reset()
    eng.update_weights(0, dict(iter_hf_state(model)))  # after a rollback any version is accepted
    assert eng.generate(req)[0][0].response_ids.tolist() == before


def test_fp8_update_forms_agree_and_fp8_greedy_matches_dequantised_model() -> None:
    cfg = tiny()
    model = model64(cfg).float()
    block = 8
    plain = TorchFP8Engine(cfg, fp8=True, fp8_block=block, dtype=torch.float32)
    plain.update_weights(0, iter_hf_state(model))
    pre = TorchFP8Engine(cfg, fp8=True, fp8_block=block, dtype=torch.float32)
    pre.update_weights(0, quantize_state(iter_hf_state(model), block))  # as the learner publishes
    for (n, a), b in zip(plain.model.named_parameters(), pre.model.parameters()):
        assert torch.equal(a, b), n
    # the FP8 engine is exactly the model with dequantised projections
    deq = Qwen3MoeForCausalLM(cfg).double().requires_grad_(False)
    deq.load_state_dict({k: v.double() for k, v in pre.model.state_dict().items()})
    r = pre.generate([GenerateRequest([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=10))])[0][0]
    greedy, logps = reference_decode(deq, [1, 2, 3], r.response_ids.tolist(), 0.0)
    assert r.response_ids.tolist() == greedy
    assert torch.allclose(r.logprobs.double(), torch.tensor(logps, dtype=torch.float64), atol=1e-4)
    assert not torch.equal(pre.model.model.layers[0].self_attn.q_proj.weight,
                           model.model.layers[0].self_attn.q_proj.weight.float())


def _update_mid_generation(interruptible: bool, pause: bool = False) -> tuple[TorchFP8Engine, list]:
    """Generate 3 greedy responses of 8 tokens; after decode step 3 an update to version 1 starts in another
    thread (with `pause`: the engine is paused first and resumed 0.3 s later from a third thread)."""
    cfg = tiny()
    m0, m1 = model64(cfg, seed=0), model64(cfg, seed=1)
    eng = engine64(cfg, m0, interruptible=interruptible, max_batch_size=4)
    new = dict(iter_hf_state(m1))
    steps = {"n": 0}
    orig = eng._decode
    updater: list[threading.Thread] = []

    def decode(*a: object) -> None:
        orig(*a)  # type: ignore[arg-type]
        steps["n"] += 1
        if steps["n"] == 3:  # start an update and wait until it is pending: it lands at the next boundary
            if pause:
                eng.pause()
                updater.append(threading.Timer(0.3, eng.resume))
            updater.append(threading.Thread(target=eng.update_weights, args=(1, new)))
            for th in updater:
                th.start()
            deadline = time.monotonic() + 30
            while not eng._swap_pending and time.monotonic() < deadline:
                time.sleep(0.005)

    eng._decode = decode  # type: ignore[method-assign]
    reqs = [GenerateRequest(p, SamplingParams(temperature=0, max_new_tokens=8)) for p in PROMPTS[:3]]
    out = eng.generate(reqs)
    for th in updater:
        th.join(30)
    return eng, out


def test_interruptible_update_applies_between_steps_with_per_token_versions() -> None:
    eng, out = _update_mid_generation(interruptible=True)
    assert eng.version == 1
    for rolls in out:
        v = rolls[0].versions.tolist()
        assert v == sorted(v) and v[0] == 0 and v[-1] == 1, v
        assert v.count(0) == 4  # prefill token + 3 decode steps with the old weights


def test_update_waits_for_the_batch_when_not_interruptible() -> None:
    eng, out = _update_mid_generation(interruptible=False)
    assert eng.version == 1
    assert all(r[0].versions.tolist() == [0] * 8 for r in out)


def test_pausing_mid_batch_does_not_let_an_update_in_when_not_interruptible() -> None:
    eng, out = _update_mid_generation(interruptible=False, pause=True)
    assert all(r[0].versions.tolist() == [0] * 8 for r in out)   # the update waited for the batch's end
    assert eng.version == 1


def test_pause_holds_generation_until_resume() -> None:
    cfg = tiny()
    eng = engine64(cfg, model64(cfg))
    eng.pause()
    result: list = []
    th = threading.Thread(target=lambda: result.append(eng.generate([GenerateRequest([1], SamplingParams())])))
    th.start()
    time.sleep(0.2)
    assert not result and eng.health()["paused"]
    eng.update_weights(1, dict(iter_hf_state(model64(cfg, seed=4))))  # updates go through while paused
    eng.resume()
    th.join(30)
    eng.pause()
    th2 = threading.Thread(target=lambda: result.append(eng.generate([GenerateRequest([1], SamplingParams())])))
    th2.start()
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match="already running"):
        eng.generate([GenerateRequest([2], SamplingParams())])
    eng.resume()
    th2.join(30)
    v = result[0][0][0].versions.tolist()
    assert v == [1] * len(v) and len(v) == 40 - 1  # default max_new_tokens 64, capped by the context


def test_fp8_weights_that_decode_to_nan_or_inf_are_refused() -> None:
    """FP8 bytes that encode NaN (0x7F / 0xFF in e4m3fn), or finite bytes whose scale overflows the compute
    dtype, are refused like any other non-finite update: WeightUpdateError, old weights and version kept."""
    cfg = tiny()
    model = model64(cfg).float()
    eng = TorchFP8Engine(cfg, fp8=True, fp8_block=8, dtype=torch.float32)
    eng.update_weights(0, quantize_state(iter_hf_state(model), 8))
    req = [GenerateRequest([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=6))]
    before = eng.generate(req)[0][0]
    good = dict(quantize_state(iter_hf_state(model64(cfg, seed=5).float()), 8))
    name = "model.layers.0.mlp.experts.3.down_proj.weight"
    nan_bytes = good[name].view(torch.uint8).clone()
    nan_bytes[2, 5] = 0x7F                      # e4m3fn NaN
    nan_bytes[0, 0] = 0xFF                      # the negative one
    big_scale = good[name + "_scale_inv"].clone()
    big_scale[0, 0] = 3e38                      # finite, but 448 * 3e38 overflows float32
    for bad in ({**good, name: nan_bytes.view(torch.float8_e4m3fn)}, {**good, name + "_scale_inv": big_scale}):
        with pytest.raises(WeightUpdateError, match=f"non-finite.*{name}"):
            eng.update_weights(1, bad)
        assert eng.version == 0
    after = eng.generate(req)[0][0]
    assert after.response_ids.tolist() == before.response_ids.tolist()
    assert torch.equal(after.logprobs, before.logprobs) and after.versions.tolist() == [0] * 6
    eng.update_weights(1, good)                  # the engine still takes a good update
    assert eng.version == 1


def test_reset_keeps_serving_the_loaded_weights_and_accepts_any_next_version() -> None:
    cfg = tiny()
    model = model64(cfg)
    eng = engine64(cfg, model)
    eng.update_weights(5, iter_hf_state(model))
    req = [GenerateRequest([1, 2, 3], SamplingParams(temperature=0, max_new_tokens=6))]
    before = eng.generate(req)[0][0]
    eng.reset()                                   # learner rolled back: forget the number, keep the weights
    r = eng.generate(req)[0][0]
    assert r.response_ids.tolist() == before.response_ids.tolist() and r.finish_reason == "length"
    assert eng.version == -1 and r.versions.tolist() == [5] * 6    # the weights' own version (wire needs >= 0)
    assert eng.health()["has_weights"] is True
    eng.update_weights(2, iter_hf_state(model64(cfg, seed=5)))   # below the old 5: accepted after reset
    assert eng.version == 2
    assert eng.generate(req)[0][0].versions.tolist() == [2] * 6
    with pytest.raises(WeightUpdateError, match="not above"):
        eng.update_weights(2, iter_hf_state(model))
