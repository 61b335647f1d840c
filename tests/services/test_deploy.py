"""Deploy paths that cannot run here (GPU, Slurm, multi-node) checked as far as they can be: the reference
configs load and pass the pipeline's sanity checks, the scripts parse, the launcher builds the right
commands, and unrunnable configs are refused with a message that says what to change."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from minirl_async.services.common import nth_addr, rollout_addrs, sanity_errors
from minirl_async.services.launch import service_specs

from minirl_async.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_reference_config_has_the_paper_hyper_parameters():
    cfg = load_config(ROOT / "configs" / "qwen3_30b_a3b_fp8.toml")
    assert cfg.learner.minibatch_groups * cfg.algo.group_size == 1024  # 64 prompts x 16
    assert (cfg.algo.eps_low, cfg.algo.eps_high, cfg.algo.is_cap) == (0.2, 0.27, 5.0)
    assert cfg.sampler.max_new_tokens == 32768 and cfg.sampler.engine == "sglang" and cfg.sampler.fp8
    assert cfg.learner.compute_dtype == "bf16" and cfg.grader.name == "math"
    assert cfg.network.curve_server_key and cfg.network.curve_client_key
    assert sanity_errors(cfg) == []


@pytest.mark.parametrize("script", sorted(str(p.relative_to(ROOT)) for p in
                                          [ROOT / "deploy" / "local.sh", *(ROOT / "deploy" / "multinode").iterdir()]))
def test_deploy_scripts_parse(script):
    out = subprocess.run(["bash", "-n", str(ROOT / script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_launcher_commands(tmp_path):
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["sampler.num_samplers=2", "learner.world_size=2",
                                                       "grader.num_graders=2", "network.rollout_addr=tcp://127.0.0.1:6000"])
    specs = {s.name: s for s in service_specs(cfg, tmp_path / "config.toml")}
    assert sorted(specs) == ["grader-0", "grader-1", "learner", "sampler-0", "sampler-1"]
    learner = specs["learner"].argv
    assert learner[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node=2" in learner
    assert learner[-3:] == ["learner", "-c", str(tmp_path / "config.toml")]
    assert specs["sampler-1"].argv[-2:] == ["--index", "1"]
    assert specs["sampler-0"].env["OMP_NUM_THREADS"] == str(cfg.sampler.threads)
    assert rollout_addrs(cfg) == ["tcp://127.0.0.1:6000", "tcp://127.0.0.1:6001"]


def test_nth_addr():
    assert nth_addr("tcp://127.0.0.1:5557", 0) == "tcp://127.0.0.1:5557"
    assert nth_addr("tcp://127.0.0.1:5557", 2) == "tcp://127.0.0.1:5559"
    assert nth_addr("ipc:///tmp/x/rollout", 1) == "ipc:///tmp/x/rollout-1"


def test_clashing_grader_addresses_are_refused_at_start(tmp_path):
    # two graders: grader 1 would bind rollout port + 1 = the scored port of the defaults
    cfg = load_config(None, ["grader.num_graders=2"])
    errors = sanity_errors(cfg)
    assert errors and "network.rollout_addr" in errors[0] and "network.scored_addr" in errors[0]
    out = subprocess.run([sys.executable, "-m", "minirl_async.cli", "run", f"run.dir={tmp_path}",
                          "grader.num_graders=2", "run.fake_compute=true"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 2 and "config error" in out.stderr and "rollout_addr" in out.stderr
