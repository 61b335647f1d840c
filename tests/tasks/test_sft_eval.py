"""Cold-start SFT and evaluation: the loss mask covers exactly the response (solution + eos); a micro run of
the real `minirl-async sft` / `eval` entry points saves a loadable HF checkpoint with tokenizer.json and
reports the eval figures; training lowers the loss on a trivial task."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minirl_async.cli import main as cli_main
from minirl_async.config import load_config
from minirl_async.tasks.base import take
from minirl_async.tasks.sft import sft_batch
from minirl_async.tasks.source import make_prompt_source
from minirl_async.tasks.tokenizer import build_char_tokenizer

MICRO = ["model.arch.hidden_size=32", "model.arch.intermediate_size=32", "model.arch.moe_intermediate_size=16",
         "model.arch.num_hidden_layers=1", "model.arch.num_attention_heads=2", "model.arch.num_key_value_heads=1",
         "model.arch.head_dim=16", "model.arch.num_experts=2", "model.arch.num_experts_per_tok=1",
         "data.task=list", "data.difficulty=1", "data.sft.batch_size=16", "data.sft.lr=1e-2", "data.sft.threads=1",
         "data.num_eval=8", "data.eval_samples=2", "sampler.max_new_tokens=8", "run.progress=false"]


def test_loss_mask_is_exactly_the_response() -> None:
    tok = build_char_tokenizer()
    prompts = take(make_prompt_source(load_config(None, ["data.task=arith,list"])), 16)
    inp_BT, tgt_BT, mask_BT = sft_batch(prompts, tok)
    for i, p in enumerate(prompts):
        prompt_ids = tok.encode_prompt(p)
        assert tgt_BT[i][mask_BT[i]].tolist() == tok.encode_response(p.solution or "")
        n = len(prompt_ids) + len(p.solution or "")  # prompt + response - 1 (inputs are shifted)
        assert inp_BT[i, :n].tolist() == (prompt_ids + tok.encode_response(p.solution or ""))[:-1]
        assert not mask_BT[i, : len(prompt_ids) - 1].any() and not mask_BT[i, n:].any()


def test_sft_then_eval_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from minirl_async.models.hf_io import load_hf

    out = tmp_path / "sft"
    assert cli_main(["sft", *MICRO, "data.sft.steps=60", f"run.dir={tmp_path}", "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 60 and (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    assert summary["loss"] < 2.0  # from ~ln(100) = 4.6 at init: it learned the format at least
    model, mcfg = load_hf(out, dtype=torch.float32)
    assert mcfg.vocab_size == 100 and mcfg.eos_token_id == 2
    assert cli_main(["eval", *MICRO, "--checkpoint", str(out), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("greedy_acc", "pass@1", "pass@2", "resp_len_mean", "resp_len_max", "truncated_frac"):
        assert key in res
    assert res["num_prompts"] == 8 and 0.0 <= res["pass@1"] <= res["pass@2"] <= 1.0


def test_engine_and_plain_loop_agree_greedily(tmp_path: Path) -> None:
    from minirl_async.tasks.evaluate import evaluate
    from minirl_async.tasks.sft import train_sft

    cfg = load_config(None, [*MICRO, "data.sft.steps=30", "sampler.fp8=false", "sampler.compute_dtype=fp32",
                             "data.num_eval=16"])
    train_sft(cfg, tmp_path / "ck", progress=False)
    eng = evaluate(cfg, tmp_path / "ck", generator="engine")
    plain = evaluate(cfg, tmp_path / "ck", generator="plain")
    assert eng["generator"].startswith("torch_fp8") and plain["generator"] == "plain_fp32"
    # Same fp32 weights, greedy: the same responses, hence the same accuracy and lengths.
    assert (eng["greedy_acc"], eng["greedy_len_mean"]) == (plain["greedy_acc"], plain["greedy_len_mean"])


def test_accuracy_figures_count_partial_credit_as_a_miss():
    from minirl_async.tasks.evaluate import accuracy

    # 2 prompts x k=2: prompt 0 gets [0.5, 0.5] (partial credit only), prompt 1 gets [1.0, 0.0]
    got = accuracy([1.0, 0.5], [0.5, 0.5, 1.0, 0.0], k=2)
    assert got == {"greedy_acc": 0.5, "pass@1": 0.25, "pass@2": 0.5, "reward_mean": 0.5}


def test_sft_progress_in_a_log_is_a_line_every_few_seconds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # stderr is not a terminal here: the bar must print a line per refresh interval (10 s), not per step
    # (the per-step loss postfix used to force a redraw: 400 lines for a 2-minute quickstart SFT)
    import time

    from minirl_async.tasks.sft import train_sft

    cfg = load_config(None, [*MICRO, "data.sft.steps=40"])
    t0 = time.monotonic()
    train_sft(cfg, tmp_path / "ck", progress=True)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sft")]
    assert 2 <= len(lines) <= 2 + (time.monotonic() - t0) / 10 and "40/40" in lines[-1] and "loss=" in lines[-1]
