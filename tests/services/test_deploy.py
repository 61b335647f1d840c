"""Deploy paths that cannot run here (GPU, Slurm, multi-node) checked as far as they can be: the reference
configs load and pass the pipeline's sanity checks, the scripts parse, the launcher and the multi-node scripts
build the right commands (the scripts in their MINIRL_DRY_RUN=1 mode, the sbatch under a fake srun/scontrol),
and unrunnable configs are refused with a message that says what to change."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import textwrap
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


# ---------------------------------------------------------------------------------------------------------
# Multi-node scripts, dry run: MINIRL_DRY_RUN=1 makes them print "[dry-run] CMD ..." instead of running it.

MULTINODE = ROOT / "deploy" / "multinode"
# learner.world_size 16 = 2 nodes x 8 GPUs; 6 samplers of TP 2 = 2 sampler nodes (4 per node); the file says 2
# graders, the command line overrides it to 3 (overrides must win everywhere).
TEST_CONFIG = """
[sampler]
engine = "sglang"
num_samplers = 6
[sampler.sglang]
tp_size = 2
[grader]
num_graders = 2
[learner]
world_size = 16
[network]
work_addr = "tcp://10.9.9.1:6555"
weights_addr = "tcp://10.9.9.1:6556"
scored_addr = "tcp://10.9.9.1:6558"
rollout_addr = "tcp://10.9.9.3:6560"
"""
OVERRIDES = ["grader.num_graders=3", "run.dir=/shared/runs/test run"]


@pytest.fixture
def test_config(tmp_path):
    path = tmp_path / "multinode.toml"
    path.write_text(TEST_CONFIG)
    return str(path)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NUM_GRADERS", "TP", "MASTER_ADDR", "MASTER_PORT",
                                                          "NNODES", "NODE_RANK", "FIRST_INDEX", "GPUS_PER_NODE")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"  # this venv's python
    env["MINIRL_DRY_RUN"] = "1"
    env.update(extra)
    return env


def _dry_commands(text: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in text.splitlines() if line.startswith("[dry-run] ")]


def _dry_run(script: str, args: list[str], **env: str) -> tuple[subprocess.CompletedProcess, list[list[str]]]:
    out = subprocess.run(["bash", str(MULTINODE / script), *args], capture_output=True, text=True, timeout=60,
                         env=_env(**env), cwd=ROOT)
    return out, _dry_commands(out.stdout)


def _cli_args(argv: list[str]):
    """Parse a service command ([env VAR=x ...] minirl-async SUB ...) with the real CLI parser."""
    from minirl_async.cli import build_parser

    env = {}
    if argv[0] == "env":
        argv = argv[1:]
        while "=" in argv[0]:
            key, value = argv.pop(0).split("=", 1)
            env[key] = value
    assert argv[0] == "minirl-async", argv
    return env, build_parser().parse_args(argv[1:])


def _torchrun(argv: list[str], monkeypatch):
    """torchrun's own parser and launch config for a printed torchrun command."""
    from torch.distributed.run import config_from_args, get_args_parser

    assert argv[0] == "torchrun", argv
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))  # torchrun sets it otherwise
    args = get_args_parser().parse_args(argv[1:])
    config, cmd, cmd_args = config_from_args(args)
    return args, config, cmd_args


@pytest.mark.parametrize("node_rank", [0, 1])
def test_learner_sh_uses_a_static_rendezvous_with_rank_0_on_the_hub(test_config, node_rank, monkeypatch):
    out, cmds = _dry_run("learner.sh", [test_config, *OVERRIDES], NNODES="2", NODE_RANK=str(node_rank))
    assert out.returncode == 0, out.stderr
    assert len(cmds) == 1
    args, config, cmd_args = _torchrun(cmds[0], monkeypatch)
    assert args.rdzv_backend == "static" and not args.standalone and not args.rdzv_endpoint
    assert config.rdzv_configs["rank"] == node_rank  # honoured only by the static backend
    assert (config.min_nodes, config.max_nodes, config.nproc_per_node) == (2, 2, 8)  # world_size 16 / 2 nodes
    assert config.rdzv_endpoint == "10.9.9.1:29500"  # the host of network.work_addr: rank 0 is the hub
    assert cmd_args[cmd_args.index("-m"):] == ["-m", "minirl_async.cli", "learner", "-c", test_config, *OVERRIDES]


def test_learner_sh_master_addr_and_refusals(test_config, monkeypatch):
    out, cmds = _dry_run("learner.sh", [test_config], NNODES="2", NODE_RANK="0", MASTER_ADDR="hub-ib0",
                         MASTER_PORT="29611")
    assert out.returncode == 0, out.stderr
    assert _torchrun(cmds[0], monkeypatch)[1].rdzv_endpoint == "hub-ib0:29611"
    assert "same machine" in out.stderr  # differs from the work_addr host: told, not refused
    out, cmds = _dry_run("learner.sh", [test_config], NNODES="3", NODE_RANK="0")
    assert out.returncode == 2 and not cmds and "not a multiple of NNODES" in out.stderr
    out, cmds = _dry_run("learner.sh", [test_config, "network.work_addr=ipc:///tmp/w"], NNODES="2", NODE_RANK="0")
    assert out.returncode != 0 and not cmds and "tcp://HOST:PORT" in out.stderr
    out, cmds = _dry_run("learner.sh", [test_config, "learner.wrold_size=2"], NNODES="2", NODE_RANK="0")
    assert out.returncode != 0 and not cmds and "world_size" in out.stderr


def test_graders_sh_starts_the_configured_graders(test_config):
    out, cmds = _dry_run("graders.sh", [test_config, *OVERRIDES])
    assert out.returncode == 0, out.stderr
    parsed = [_cli_args(c) for c in cmds]
    assert [a.index for _, a in parsed] == [0, 1, 2]  # grader.num_graders = 3 after the override
    for env, a in parsed:
        assert a.command == "grader" and a.config == test_config and a.overrides == OVERRIDES
        assert env == {"OMP_NUM_THREADS": "1"}
    out, cmds = _dry_run("graders.sh", [test_config, *OVERRIDES], NUM_GRADERS="3")  # agreeing: fine
    assert out.returncode == 0 and len(cmds) == 3
    out, cmds = _dry_run("graders.sh", [test_config, *OVERRIDES], NUM_GRADERS="4")
    assert out.returncode == 2 and not cmds and "grader.num_graders" in out.stderr


@pytest.mark.parametrize(("first", "indices"), [(0, [0, 1, 2, 3]), (4, [4, 5])])
def test_samplers_sh_uses_the_configured_tp(test_config, first, indices):
    out, cmds = _dry_run("samplers.sh", [test_config, *OVERRIDES], FIRST_INDEX=str(first), GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    parsed = [_cli_args(c) for c in cmds]
    assert [a.index for _, a in parsed] == indices  # 4 per node at TP 2, never beyond num_samplers = 6
    assert [env["CUDA_VISIBLE_DEVICES"] for env, _ in parsed] == ["0,1", "2,3", "4,5", "6,7"][:len(indices)]
    assert all(a.command == "sampler" and a.overrides == OVERRIDES for _, a in parsed)


def test_samplers_sh_refuses_a_tp_other_than_the_config(test_config):
    out, cmds = _dry_run("samplers.sh", [test_config], TP="4")
    assert out.returncode == 2 and not cmds and "sampler.sglang.tp_size" in out.stderr
    out, cmds = _dry_run("samplers.sh", [test_config, "sampler.sglang.tp_size=4"], TP="4", GPUS_PER_NODE="8")
    assert out.returncode == 0 and [_cli_args(c)[0]["CUDA_VISIBLE_DEVICES"] for c in cmds] == ["0,1,2,3", "4,5,6,7"]
    out, cmds = _dry_run("samplers.sh", [test_config], FIRST_INDEX="6")
    assert out.returncode == 2 and not cmds


FAKE_SRUN = textwrap.dedent("""\
    #!/usr/bin/env bash
    # srun [--opt value | --whole] ... CMD: record the options, run CMD with its output in a file per node
    opts=(); node=""
    while [[ "$1" == -* ]]; do
        if [ "$1" = --whole ]; then opts+=("$1"); shift; continue; fi
        [ "$1" = -w ] && node="$2"
        opts+=("$1" "$2"); shift 2
    done
    printf '%s\\n' "${opts[@]}" > "$FAKE_SLURM/srun-$node.opts"
    exec "$@" > "$FAKE_SLURM/step-$node.out" 2>&1
    """)


def _sbatch(tmp_path: Path, nodes: list[str], args: list[str], **env: str):
    """Run slurm.sbatch with bash under a fake Slurm: scontrol lists `nodes`, srun runs each step locally."""
    fake = tmp_path / "fake-slurm"
    fake.mkdir(exist_ok=True)
    (fake / "srun").write_text(FAKE_SRUN)
    (fake / "scontrol").write_text("#!/usr/bin/env bash\n"
                                   f'[ "$*" = "show hostnames fake[1-{len(nodes)}]" ] || exit 1\n'
                                   f"printf '%s\\n' {' '.join(nodes)}\n")
    for tool in ("srun", "scontrol"):
        (fake / tool).chmod(0o755)
    run_env = _env(SLURM_JOB_NODELIST=f"fake[1-{len(nodes)}]", SLURM_SUBMIT_DIR=str(ROOT), FAKE_SLURM=str(fake),
                   **env)
    run_env["PATH"] = f"{fake}{os.pathsep}{run_env['PATH']}"
    out = subprocess.run(["bash", str(MULTINODE / "slurm.sbatch"), *args], capture_output=True, text=True,
                         timeout=120, env=run_env, cwd=ROOT)
    steps = {}
    for opts in sorted(fake.glob("srun-*.opts")):
        node = opts.name[len("srun-"):-len(".opts")]
        text = (fake / f"step-{node}.out").read_text()
        steps[node] = (opts.read_text().split("\n")[:-1], _dry_commands(text), text)
    return out, steps


def test_slurm_sbatch_places_services_and_points_every_address_at_the_allocated_nodes(tmp_path, test_config,
                                                                                       monkeypatch):
    nodes = ["gpu-b7", "gpu-a2", "gpu-c1", "gpu-a9", "cpu-x1", "spare-1"]  # scontrol order, not sorted
    out, steps = _sbatch(tmp_path, nodes, [test_config, *OVERRIDES], GPUS_PER_NODE="8")
    assert out.returncode == 0, out.stderr
    assert sorted(steps) == sorted(nodes[:5])  # 2 learner + 2 sampler + 1 grader node; the spare stays idle
    for node, (opts, cmds, text) in steps.items():
        assert "--whole" in opts and opts[opts.index("--nodes") + 1] == "1" and opts[opts.index("-w") + 1] == node
        assert cmds, f"{node} printed no command: {text}"
    hub, grader_node = nodes[0], nodes[4]
    want = {"work_addr": f"tcp://{hub}:6555", "weights_addr": f"tcp://{hub}:6556",
            "scored_addr": f"tcp://{hub}:6558", "rollout_addr": f"tcp://{grader_node}:6560"}

    def check_addresses(config: str, overrides: list[str]) -> None:
        cfg = load_config(config, overrides)  # what the service itself will resolve
        assert {k: getattr(cfg.network, k) for k in want} == want
        assert cfg.grader.num_graders == 3 and cfg.run.dir == "/shared/runs/test run"

    # learner nodes: torchrun, static rendezvous, node rank = position, master = the hub
    for rank, node in enumerate(nodes[:2]):
        (cmd,) = steps[node][1]
        args, config, cmd_args = _torchrun(cmd, monkeypatch)
        assert args.rdzv_backend == "static" and config.rdzv_configs["rank"] == rank
        assert (config.min_nodes, config.nproc_per_node) == (2, 8) and config.rdzv_endpoint == f"{hub}:29500"
        i = cmd_args.index("-c")
        check_addresses(cmd_args[i + 1], cmd_args[i + 2:])
    # sampler nodes: 4 samplers of TP 2 each, then the remaining 2; indices 0..5 exactly once
    indices = []
    for node, count in ((nodes[2], 4), (nodes[3], 2)):
        parsed = [_cli_args(c) for c in steps[node][1]]
        assert len(parsed) == count and all(a.command == "sampler" for _, a in parsed)
        indices += [a.index for _, a in parsed]
        for _, a in parsed:
            check_addresses(a.config, a.overrides)
    assert indices == list(range(6))
    # the grader node: grader.num_graders graders, binding the rollout address the samplers connect to
    parsed = [_cli_args(c) for c in steps[grader_node][1]]
    assert [a.index for _, a in parsed] == [0, 1, 2]
    for _, a in parsed:
        check_addresses(a.config, a.overrides)


def test_slurm_sbatch_refuses_too_few_nodes_or_a_disagreeing_count(tmp_path, test_config):
    out, steps = _sbatch(tmp_path, ["n1", "n2", "n3", "n4"], [test_config, *OVERRIDES])
    assert out.returncode == 2 and not steps and "needs 5 nodes" in out.stderr
    out, steps = _sbatch(tmp_path, [f"n{i}" for i in range(5)], [test_config, *OVERRIDES], NUM_GRADERS="4")
    assert out.returncode == 2 and not steps and "grader.num_graders" in out.stderr
    out, steps = _sbatch(tmp_path, [f"n{i}" for i in range(5)], [test_config, "network.weights_addr=ipc:///tmp/w"])
    assert out.returncode == 2 and not steps and "tcp://HOST:PORT" in out.stderr


def test_slurm_sbatch_fits_the_reference_config_in_five_nodes(tmp_path):
    """The header of slurm.sbatch and the reference config say `sbatch --nodes 5`."""
    out, steps = _sbatch(tmp_path, [f"node{i}" for i in range(5)], ["configs/qwen3_30b_a3b_fp8.toml"])
    assert out.returncode == 0, out.stderr
    assert len(steps) == 5 and all(cmds for _, cmds, _ in steps.values())
