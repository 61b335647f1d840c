"""The pipeline as real processes on loopback (learner, sampler, grader started by `minirl-async run`),
with the compute faked (`run.fake_compute`) so each run takes seconds: what is tested here is the
services, the controller's ledger and the staleness bound, not the model."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # importlib mode: the helpers module is not on the path
from pipeline_helpers import FAKE, metrics, net_overrides, run_cli, trained_ids_by_step  # noqa: E402

CONTRACT = [
    "reward/mean", "reward/acc", "reward/std_in_group", "reward/zero_adv_groups", "kl/train_infer_k1",
    "kl/train_infer_k3", "kl/staleness_k3", "policy/entropy", "loss/clip_frac", "is/d_mean", "is/d_max",
    "is/trunc_frac", "routing/agree_frac", "routing/agree_frac_l0", "staleness/lag_updates_mean",
    "staleness/lag_updates_max", "staleness/version_lag_max", "replay/mode", "pipeline/dropped_stale",
    "pipeline/reissued", "pipeline/grader_errors", "perf/step_s", "perf/sample_tok_s", "perf/train_tok_s",
    "perf/weight_sync_s",
]


def test_short_run_writes_contract_metrics_and_report(tmp_path):
    out = run_cli(tmp_path, FAKE + net_overrides() + ["learner.num_steps=4"])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = metrics(tmp_path)
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    for r in rows:
        missing = [k for k in CONTRACT if k not in r]
        assert not missing, missing
        assert r["pipeline/lost"] == 0
    assert (tmp_path / "config.toml").is_file() and (tmp_path / "report" / "summary.md").is_file()
    ids = [g for step in trained_ids_by_step(tmp_path).values() for g in step]
    assert len(ids) == 16 == len(set(ids))


def test_a_service_that_fails_at_start_shows_why(tmp_path):
    # a config error only the learner finds (no JSONL path) was only in logs/learner.log
    out = run_cli(tmp_path, FAKE + net_overrides() + ["data.task=jsonl"])
    assert out.returncode == 1
    assert "learner did not become ready" in out.stdout
    assert "data.task = 'jsonl' needs data.jsonl_path" in out.stdout


def test_fresh_start_in_a_used_run_dir_sets_old_checkpoints_aside(tmp_path):
    first = run_cli(tmp_path, FAKE + net_overrides() + ["learner.num_steps=4", "learner.checkpoint_every=2"])
    assert first.returncode == 0, first.stdout + first.stderr
    old = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert old
    again = run_cli(tmp_path, FAKE + net_overrides() + ["learner.num_steps=2", "learner.resume=false",
                                                        "learner.checkpoint_every=1"])
    assert again.returncode == 0, again.stdout + again.stderr
    aside = list(tmp_path.glob("checkpoints.before-*"))
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == old
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000001.json", "step_000002.json"]
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1]   # this run's metrics only; the first run's aside
    assert len(list(tmp_path.glob("metrics.jsonl.before-*"))) == 1
    assert "earlier run's checkpoints moved" in (tmp_path / "events.log").read_text()


@pytest.mark.parametrize("eta", [0, 2])
def test_staleness_bound_holds(tmp_path, eta):
    # Two samplers racing one learner: the admission bound and the guard must keep every trained sample
    # within eta versions; with eta = 2 the pipeline does run ahead (some lag > 0).
    out = run_cli(tmp_path, FAKE + net_overrides() + [
        "learner.num_steps=8", f"staleness.max_staleness={eta}", "sampler.num_samplers=2"])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = metrics(tmp_path)
    assert len(rows) == 8
    lags = [r["staleness/version_lag_max"] for r in rows]
    assert max(lags) <= eta
    if eta == 0:
        assert all(r["staleness/lag_updates_max"] == 0 for r in rows)
    else:
        assert max(lags) > 0
    assert rows[-1]["pipeline/lost"] == 0
    # bounded memory: the ledger never holds more than the admission window
    assert all(r["pipeline/in_flight"] + r["pipeline/requeued"] + r["pipeline/ready"] <= (eta + 1) * 4 for r in rows)


@pytest.mark.parametrize("n,mode", [(1, 2), (2, 2), (4, 3)])
def test_auto_replay_choice_follows_updates_per_step(tmp_path, n, mode):
    # On-policy (eta = 0) with N minibatches: max_lag = N - 1, so R2 at N = 1, 2 and R3 at N = 4.
    out = run_cli(tmp_path, FAKE + net_overrides() + [
        "learner.num_steps=2", "staleness.max_staleness=0", f"learner.minibatch_groups={4 // n}"])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = metrics(tmp_path)
    assert [r["replay/mode"] for r in rows] == [mode, mode]
    assert all(r["replay/max_lag"] == n - 1 for r in rows)


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_killing_each_service_loses_and_duplicates_nothing(tmp_path, sig):
    """SIGKILL (or SIGTERM) the sampler, then the grader, then the learner mid-run: the launcher restarts
    each, the learner resumes from its checkpoint, and the ledger proves every issued group is accounted for
    and no group id is in two trained batches of the final history. SIGTERM: every service stopped by a
    signal before the end exits 128 + 15, not 0 (which the launcher took for 'told to stop by the learner':
    the run stalled after the sampler's stop, or a stopped learner counted as a finished run), and the
    launcher restarts it. A finished run has no restart in its events."""
    import json
    import os
    import signal
    import subprocess
    import time

    signum = getattr(signal, sig)

    steps = 16
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", "configs/tiny.toml", f"run.dir={tmp_path}",
           *FAKE, *net_overrides(), f"learner.num_steps={steps}", "learner.checkpoint_every=2",
           "staleness.lease_s=3", "run.fake_step_s=0.1", "run.stop_grace_s=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    victims = [("sampler-0", 2), ("grader-0", 5), ("learner", 9)]
    try:
        deadline = time.monotonic() + 150
        while victims and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            path = tmp_path / "metrics.jsonl"
            done = len(path.read_text().splitlines()) if path.is_file() else 0
            name, after = victims[0]
            if done >= after:
                pids = json.loads((tmp_path / "status" / "pids.json").read_text())
                os.kill(pids[name], signum)
                victims.pop(0)
        assert not victims, f"run ended or timed out before killing {victims}"
        out, _ = proc.communicate(timeout=150)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    events = (tmp_path / "events.log").read_text()
    code = -9 if sig == "SIGKILL" else 128 + signal.SIGTERM   # SIGTERM: a clean stop, but before the end
    codes = {"sampler-0": code, "grader-0": code, "learner": code}
    for name, code in codes.items():
        assert f"launcher: {name} exited {code}, restarted" in events, (name, events)
    assert events.count(", restarted") == 3   # none at the end (a sampler told 'done' before the learner exits)
    assert "resumed at version" in events
    by_step = trained_ids_by_step(tmp_path)
    assert sorted(by_step) == list(range(steps))
    ids = [g for s in range(steps) for g in by_step[s]]
    assert len(ids) == len(set(ids)) == steps * 4  # nothing trained twice
    last = metrics(tmp_path)[-1]
    assert last["pipeline/lost"] == 0
    assert last["pipeline/trained"] == steps * 4
    # everything issued is trained or still accounted for (in flight / requeued / ready)
    assert last["pipeline/issued"] == (last["pipeline/trained"] + last["pipeline/in_flight"]
                                       + last["pipeline/requeued"] + last["pipeline/ready"])


@pytest.mark.parametrize("sampler", [[], ["sampler.fp8=false", "sampler.compute_dtype=fp32"]],
                         ids=["fp8-bf16", "fp32"])
def test_real_tiny_model_end_to_end(tmp_path, sampler):
    """The real engine and trainer (random-init tiny model, no SFT): two steps, contract metrics, final
    HF export, every trained sample within the staleness bound; also with an fp32 sampler without FP8 (the
    learner then sends its live fp32 tensors as they are, not casts; zero-copy views of those are tracked
    until sent, see tests/proto/test_sockets.py: this model's tensors are below the 1 MiB viewing size)."""
    from minirl_async.bench.overlap import _random_checkpoint

    ckpt = _random_checkpoint(tmp_path / "init")
    out = run_cli(tmp_path / "run", net_overrides() + [
        f"run.sft_checkpoint={ckpt}", "run.progress=false", "run.eval_after=false", "learner.num_steps=2",
        "learner.groups_per_step=4", "learner.minibatch_groups=2", "algo.group_size=4",
        "sampler.max_batch_size=16", "sampler.max_new_tokens=16", *sampler], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [0, 1]
    for r in rows:
        assert not [k for k in CONTRACT if k not in r]
        assert r["staleness/version_lag_max"] <= 1 and r["pipeline/lost"] == 0
    assert (tmp_path / "run" / "final" / "config.json").is_file()


def test_malformed_messages_are_counted_and_dropped(tmp_path):
    """Garbage on the learner's PULL and ROUTER and on the grader's PULL mid-run: counted, dropped, and the
    run completes with nothing lost."""
    import subprocess
    import time

    import zmq

    net = net_overrides()
    addr = {kv.split("=")[0].split(".")[1]: kv.split("=")[1] for kv in net}
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", "configs/tiny.toml", f"run.dir={tmp_path}",
           *FAKE, *net, "learner.num_steps=8", "run.fake_step_s=0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    ctx = zmq.Context()
    try:
        while not (tmp_path / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.1)
        junk = [[b"not msgpack"], [b"\x81\xa5proto\x63"], [b"\x82\xa5proto\x01\xa4type\xa4Nope"]]
        for key, kind in (("scored_addr", zmq.PUSH), ("rollout_addr", zmq.PUSH), ("work_addr", zmq.DEALER)):
            s = ctx.socket(kind)
            s.setsockopt(zmq.LINGER, 5000)
            s.connect(addr[key])
            time.sleep(0.3)  # let the connection complete: a PUSH without a live pipe queues nothing yet
            for frames in junk:
                s.send_multipart(frames)
            s.close()
        out, _ = proc.communicate(timeout=120)
    finally:
        ctx.term()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    rows = metrics(tmp_path)
    assert len(rows) == 8 and rows[-1]["pipeline/lost"] == 0
    assert rows[-1]["pipeline/bad_messages"] >= 6  # 3 on the PULL + 3 on the ROUTER of the learner
    assert "dropped a bad message" in (tmp_path / "logs" / "grader-0.log").read_text()


@pytest.mark.slow
def test_real_two_rank_learner_under_torchrun(tmp_path):
    """learner.world_size = 2: the launcher starts the learner with torchrun (FSDP2 over gloo); rank 0 hands
    batches, weight walks, checkpoints and the export to rank 1."""
    from minirl_async.bench.overlap import _random_checkpoint

    ckpt = _random_checkpoint(tmp_path / "init")
    out = run_cli(tmp_path / "run", net_overrides() + [
        f"run.sft_checkpoint={ckpt}", "run.progress=false", "run.eval_after=false", "learner.num_steps=3",
        "learner.world_size=2", "learner.checkpoint_every=2", "learner.groups_per_step=4",
        "learner.minibatch_groups=2", "algo.group_size=4", "sampler.max_batch_size=16",
        "sampler.max_new_tokens=16"], timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [r["step"] for r in metrics(tmp_path / "run")] == [0, 1, 2]
    assert (tmp_path / "run" / "final" / "config.json").is_file()
    assert len(list((tmp_path / "run" / "checkpoints").glob("step_*"))) == 2


def test_curve_encrypted_pipeline(tmp_path):
    """CurveZMQ on every socket (keys written by `minirl-async keys`, clients allow-listed): the run completes;
    a plain-text peer cannot inject anything (its handshake fails, so nothing even reaches the decoder)."""
    import shutil
    import subprocess
    import time

    import zmq

    keys = tmp_path / "keys"
    for name in ("server", "client"):
        subprocess.run([sys.executable, "-m", "minirl_async.cli", "keys", str(keys), "--name", name], check=True,
                       capture_output=True, timeout=60)
    (keys / "clients").mkdir()
    shutil.copy(keys / "client.key", keys / "clients" / "client.key")
    net = net_overrides()
    scored = [kv.split("=")[1] for kv in net if kv.startswith("network.scored_addr")][0]
    curve = [f"network.curve_server_key={keys / 'server.key_secret'}",
             f"network.curve_client_key={keys / 'client.key_secret'}",
             f"network.curve_server_public={keys / 'server.key'}", f"network.curve_allowed_clients={keys / 'clients'}"]
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", "configs/tiny.toml", f"run.dir={tmp_path / 'run'}",
           *FAKE, *net, *curve, "learner.num_steps=4", "run.fake_step_s=0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    ctx = zmq.Context()
    try:
        while not (tmp_path / "run" / "metrics.jsonl").is_file() and proc.poll() is None:
            time.sleep(0.1)
        s = ctx.socket(zmq.PUSH)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(scored)
        s.send_multipart([b"plain-text junk"])
        out, _ = proc.communicate(timeout=120)
        s.close()
    finally:
        ctx.term()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    rows = metrics(tmp_path / "run")
    assert len(rows) == 4 and rows[-1]["pipeline/bad_messages"] == 0 and rows[-1]["pipeline/lost"] == 0


def test_failing_grader_groups_are_reissued(tmp_path):
    """A plugin grader that raises on some samples: with failure_policy = drop_group those groups are
    re-issued (counted in pipeline/grader_errors) and the run still trains every step on whole groups."""
    plugin = tmp_path / "flaky.py"
    plugin.write_text(
        "import random\n"
        "def grade(sample):\n"
        "    if random.random() < 0.05:\n"
        "        raise RuntimeError('flaky grader')\n"
        "    return float(sample.response_text.endswith(sample.meta['answer']))\n")
    out = run_cli(tmp_path / "run", FAKE + net_overrides() + [
        "learner.num_steps=6", f"grader.name={plugin}:grade", "grader.failure_policy=drop_group"])
    assert out.returncode == 0, out.stdout + out.stderr
    rows = metrics(tmp_path / "run")
    assert len(rows) == 6
    last = rows[-1]
    # each grader error requeues its prompt (reissued later, or still requeued at the end) or, at the
    # max_invalid-th failure of the same prompt, discards it (p ~ 0.185^3 per prompt here: it happens)
    assert last["pipeline/grader_errors"] > 0 and last["pipeline/reissued"] + last["pipeline/discarded"] >= \
        last["pipeline/grader_errors"] - last["pipeline/requeued"]
    assert last["pipeline/lost"] == 0 and last["pipeline/trained"] == 24


@pytest.mark.slow
def test_real_compute_survives_sampler_and_learner_kills(tmp_path):
    """The same SIGKILL drill with the real engine and trainer: the learner resumes from its checkpoint
    (model, optimizer, controller), the sampler that holds newer weights resets its engine and reloads."""
    import json
    import os
    import signal
    import subprocess
    import time

    from minirl_async.bench.overlap import _random_checkpoint

    ckpt = _random_checkpoint(tmp_path / "init")
    steps = 10
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "minirl_async.cli", "run", "-c", "configs/tiny.toml", f"run.dir={run}",
           *net_overrides(), f"run.sft_checkpoint={ckpt}", "run.progress=false", "run.eval_after=false",
           f"learner.num_steps={steps}", "learner.checkpoint_every=2", "learner.groups_per_step=4",
           "learner.minibatch_groups=4", "algo.group_size=4", "sampler.max_batch_size=16",
           "sampler.max_new_tokens=16", "staleness.lease_s=5", "run.stop_grace_s=3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    victims = [("sampler-0", 2), ("learner", 5)]
    try:
        deadline = time.monotonic() + 400
        while victims and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.1)
            path = run / "metrics.jsonl"
            done = len(path.read_text().splitlines()) if path.is_file() else 0
            if done >= victims[0][1]:
                os.kill(json.loads((run / "status" / "pids.json").read_text())[victims[0][0]], signal.SIGKILL)
                victims.pop(0)
        assert not victims
        out, _ = proc.communicate(timeout=400)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out
    events = (run / "events.log").read_text()
    assert "resumed at version" in events
    by_step = trained_ids_by_step(run)
    assert sorted(by_step) == list(range(steps))
    ids = [g for s in range(steps) for g in by_step[s]]
    assert len(ids) == len(set(ids))
    assert metrics(run)[-1]["pipeline/lost"] == 0


def test_local_sh_runs_each_service_as_its_own_process(tmp_path):
    # the README's "one service alone" path: deploy/local.sh CONFIG overrides (no supervising launcher)
    import subprocess

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["bash", "deploy/local.sh", "configs/tiny.toml", f"run.dir={tmp_path}", *FAKE,
                          *net_overrides(), "learner.num_steps=3"],
                         cwd=root, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert [r["step"] for r in metrics(tmp_path)] == [0, 1, 2]
    assert {p.name for p in (tmp_path / "logs").iterdir()} >= {"learner.log", "grader-0.log", "sampler-0.log"}
