"""Checkpoints: bit-exact resume, atomic writes under a simulated crash, keep-last-K, the extra slot, RNG
states, and HF export loadable by our loader and by transformers."""

from __future__ import annotations

import copy

import pytest
import torch
from learner_util import make_groups, run_config, tiny_model

from minirl_async.learner import Trainer
from minirl_async.learner.checkpoint import list_checkpoints, save_checkpoint

OVR = ("learner.deterministic=true", "learner.lr_schedule=cosine", "learner.warmup_steps=1",
       "learner.num_steps=4", "learner.keep_last=2")


@pytest.fixture(autouse=True)
def _restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)


def _state(tr: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in tr.iter_full_state()}


def test_resume_is_bit_exact(tmp_path):
    model = tiny_model(dtype=torch.float32)
    data = [make_groups(model, seed=10 + s) for s in range(4)]
    modes = ["none", "r2", "r3", "r2"]
    a = Trainer(run_config(*OVR), copy.deepcopy(model))
    for s in range(2):
        a.train_step(data[s], modes[s])
    a.save_checkpoint(tmp_path, extra={"controller": {"cursor": 7, "ledger": ["g1", "g2"]}})
    rng_after_save = torch.rand(3)
    ma = [a.train_step(data[s], modes[s]) for s in (2, 3)]

    b = Trainer(run_config(*OVR), tiny_model(seed=123, dtype=torch.float32))   # different weights
    extra = b.load_latest(tmp_path)
    assert extra == {"controller": {"cursor": 7, "ledger": ["g1", "g2"]}}
    assert b.version == 2 and b.scheduler.last_epoch == a.scheduler.last_epoch - 4
    assert torch.equal(torch.rand(3), rng_after_save)   # RNG states restored
    mb = [b.train_step(data[s], modes[s]) for s in (2, 3)]
    sa, sb = _state(a), _state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    for x, y in zip(ma, mb):
        assert {k: v for k, v in x.items() if not k.startswith("perf/")} == \
               {k: v for k, v in y.items() if not k.startswith("perf/")}
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    for k in oa["state"]:
        assert torch.equal(oa["state"][k]["exp_avg_sq"], ob["state"][k]["exp_avg_sq"])
    assert b.version == 4 and a.scheduler.get_last_lr() == b.scheduler.get_last_lr()


def test_crash_mid_write_keeps_last_good(tmp_path, model):
    tr = Trainer(run_config(*OVR), copy.deepcopy(model))
    groups = make_groups(model)
    tr.train_step(groups, "none")
    good = tr.save_checkpoint(tmp_path, extra={"v": 1})
    w_good = _state(tr)
    tr.train_step(groups, "none")
    for fail in ("model.pt", "optim.pt", "trainer.pt"):
        with pytest.raises(RuntimeError, match="simulated crash"):
            save_checkpoint(tr, tmp_path, {"v": 2}, keep_last=2, _fail_after=fail)
        assert list_checkpoints(tmp_path) == [good]
    fresh = Trainer(run_config(*OVR), tiny_model(seed=5))
    assert fresh.load_latest(tmp_path) == {"v": 1} and fresh.version == 1
    assert all(torch.equal(t, w_good[k]) for k, t in fresh.iter_full_state())
    # the next successful save removes the debris of the crashed ones
    tr.save_checkpoint(tmp_path, extra={"v": 2})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001", "step_00000002"]


def test_unreadable_newest_falls_back_and_interrupted_resave_recovers(tmp_path, model, caplog):
    tr = Trainer(run_config(*OVR), copy.deepcopy(model))
    groups = make_groups(model)
    tr.train_step(groups, "none")
    tr.save_checkpoint(tmp_path, extra={"v": 1})
    w1 = _state(tr)
    tr.train_step(groups, "none")
    newest = tr.save_checkpoint(tmp_path, extra={"v": 2})
    optim = newest / "optim.pt"
    optim.write_bytes(optim.read_bytes()[:100])     # truncated, as after a power loss without fsync
    fresh = Trainer(run_config(*OVR), tiny_model(seed=5))
    w_fresh = _state(fresh)
    with caplog.at_level("WARNING"):
        assert fresh.load_latest(tmp_path) == {"v": 1} and fresh.version == 1
    assert "step_00000002" in caplog.text and "trying the previous one" in caplog.text
    assert all(torch.equal(t, w1[k]) for k, t in fresh.iter_full_state())
    # nothing readable: the newest error is raised, and the trainer is untouched (files read before applying)
    (tmp_path / "step_00000001" / "model.pt").write_bytes(b"")
    fresh = Trainer(run_config(*OVR), tiny_model(seed=5))
    with pytest.raises(Exception, match="(?i)zip|archive|ran out of input|eof"):
        fresh.load_latest(tmp_path)
    assert fresh.version == 0 and all(torch.equal(t, w_fresh[k]) for k, t in fresh.iter_full_state())


def test_crash_between_the_renames_of_a_resave(tmp_path, model):
    tr = Trainer(run_config(*OVR), copy.deepcopy(model))
    tr.train_step(make_groups(model), "none")
    tr.save_checkpoint(tmp_path, extra={"v": "first"})
    with pytest.raises(RuntimeError, match="between the two renames"):
        save_checkpoint(tr, tmp_path, {"v": "second"}, keep_last=1, _fail_after="move aside")
    assert list_checkpoints(tmp_path) == []          # step_00000001 is only the moved-aside folder now
    fresh = Trainer(run_config(*OVR), tiny_model(seed=5))
    assert fresh.load_latest(tmp_path) == {"v": "first"} and fresh.version == 1   # put back, not lost
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".tmp-step")] == ["step_00000001"]


def test_keep_last_and_empty_root(tmp_path, model):
    tr = Trainer(run_config(*OVR), copy.deepcopy(model))
    assert tr.load_latest(tmp_path / "none") is None
    for v in range(5):
        tr.version = v
        tr.save_checkpoint(tmp_path, extra={"v": v})
    tr.save_checkpoint(tmp_path, extra={"v": "again"})   # same version twice: replaced atomically
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000003", "step_00000004"]
    assert tr.load_latest(tmp_path) == {"v": "again"}
    with pytest.raises(ValueError, match="not a learner checkpoint"):
        from minirl_async.learner.checkpoint import load_checkpoint
        load_checkpoint(tr, tmp_path)
    # a lower version saved among higher ones (another run's) is kept, and so are they
    tr.version = 1
    assert tr.save_checkpoint(tmp_path, extra={"v": 1}) == tmp_path / "step_00000001"
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000001", "step_00000003", "step_00000004"]


def test_export_hf_loads_in_ours_and_transformers(tmp_path, model):
    transformers = pytest.importorskip("transformers")
    from minirl_async.models.hf_io import load_hf

    tr = Trainer(run_config(), copy.deepcopy(model).float())
    tr.train_step(make_groups(model), "r2")
    out = tr.export_hf(tmp_path / "hf")
    ids = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = tr.model(ids)
        ours, _ = load_hf(out, dtype=torch.float32)
        assert torch.equal(ours(ids), want)
        hf = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32)
        got = hf(ids).logits
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_bf16_compute_publishes_fp32_masters(tmp_path, model):
    # bf16 compute in one process runs FSDP2 on a world-1 group; after a step its root unit (embedding,
    # final norm, LM head) is left unsharded as bf16 copies: published / exported weights must still be the
    # fp32 masters the optimizer updates
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from minirl_async.models.hf_io import load_hf

    assert not dist.is_initialized()
    try:
        tr = Trainer(run_config("learner.compute_dtype=bf16"), copy.deepcopy(model).float())
        tr.train_step(make_groups(model), "r2")
        state = _state(tr)   # first: reading the state dict below reshards the root as a side effect
        masters = get_model_state_dict(tr.policy, options=StateDictOptions(full_state_dict=True))
        assert masters["model.lm_head.weight"].dtype == torch.float32
        assert all(t.dtype == torch.float32 for t in state.values())
        assert torch.equal(state["lm_head.weight"], masters["model.lm_head.weight"])
        assert torch.equal(state["model.embed_tokens.weight"], masters["model.model.embed_tokens.weight"])
        tr.train_step(make_groups(model), "r2")   # forward again: the root is unsharded once more
        out = tr.export_hf(tmp_path / "hf")
        loaded, _ = load_hf(out, dtype=torch.float32)
        masters = get_model_state_dict(tr.policy, options=StateDictOptions(full_state_dict=True))
        assert torch.equal(loaded.lm_head.weight, masters["model.lm_head.weight"])
        assert torch.equal(loaded.model.norm.weight, masters["model.model.norm.weight"])
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
