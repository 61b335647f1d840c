"""Config loading: precedence, every error case with its message, cross-field checks, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from minirl_async.config import Config, ConfigError, describe, load_config, save_config

ROOT = Path(__file__).resolve().parents[2]


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.toml"
    p.write_text(text)
    return p


def test_defaults_file_overrides_precedence(tmp_path: Path) -> None:
    p = write(tmp_path, "[learner]\nlr = 0.5\nnum_steps = 7\n")
    cfg = load_config(p, ["learner.lr=0.25", "algo.loss=grpo", "run.dir=/tmp/x y"])
    assert cfg.learner.lr == 0.25  # override beats file
    assert cfg.learner.num_steps == 7  # file beats default
    assert cfg.learner.grad_clip == Config().learner.grad_clip  # default
    assert cfg.algo.loss == "grpo"  # bare string override
    assert cfg.run.dir == "/tmp/x y"


def test_unknown_key_names_key_file_and_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "[staleness]\nmax_stalenes = 2\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "staleness.max_stalenes" in msg and str(p) in msg and "staleness.max_staleness" in msg


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    p = write(tmp_path, "[lerner]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'lerner'.*did you mean 'learner'"):
        load_config(p)


def test_unknown_nested_key_in_override() -> None:
    with pytest.raises(ConfigError, match=r"override 'model.arch.hiden_size=3'.*model\.arch\.hidden_size"):
        load_config(None, ["model.arch.hiden_size=3"])


def test_wrong_type_names_key_and_file(tmp_path: Path) -> None:
    p = write(tmp_path, '[learner]\nnum_steps = "many"\n')
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "learner.num_steps" in str(e.value) and str(p) in str(e.value) and "many" in str(e.value)


def test_out_of_range_and_bad_literal() -> None:
    with pytest.raises(ConfigError, match=r"sampler\.top_p"):
        load_config(None, ["sampler.top_p=1.5"])
    with pytest.raises(ConfigError, match=r"algo\.loss"):
        load_config(None, ["algo.loss=ppo"])
    with pytest.raises(ConfigError, match=r"staleness\.routing_replay"):
        load_config(None, ["staleness.routing_replay=r4"])


def test_a_key_without_its_section_suggests_the_section() -> None:
    with pytest.raises(ConfigError, match=r"unknown config key 'num_steps'; did you mean 'learner.num_steps'"):
        load_config(None, ["num_steps=2"])


@pytest.mark.parametrize("override,key", [
    ("run.dir=", "run.dir"),                       # was the current directory: run files in the repo root
    ("learner.lr=inf", "learner.lr"), ("algo.is_cap=inf", "algo.is_cap"), ("run.stop_grace_s=inf", "run.stop_grace_s"),
    ("staleness.r3_kl_threshold=-1", "staleness.r3_kl_threshold"),
])
def test_values_that_mean_nothing_are_refused(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, [override])


def test_string_fields_take_bare_text_as_typed() -> None:
    # TOML would read these as an integer and a date
    assert load_config(None, ["run.dir=2024"]).run.dir == "2024"
    assert load_config(None, ["run.dir=2024-06-01"]).run.dir == "2024-06-01"
    assert load_config(None, ['run.dir="a b"']).run.dir == "a b"
    assert load_config(None, ["learner.num_steps=7"]).learner.num_steps == 7   # other fields still parse TOML


def test_section_given_a_scalar(tmp_path: Path) -> None:
    p = write(tmp_path, "learner = 3\n")
    with pytest.raises(ConfigError, match=r"'learner' is a section"):
        load_config(p)


def test_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[learner\n"))


def test_malformed_override() -> None:
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["learner.lr"])


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (["learner.groups_per_step=6", "learner.minibatch_groups=4"], r"multiple of learner\.minibatch_groups"),
        (["algo.group_size=1"], r"at least 2 responses"),
        (["model.arch.num_attention_heads=4", "model.arch.num_key_value_heads=3"], r"must divide"),
        (["model.arch.num_experts=2", "model.arch.num_experts_per_tok=3"], r"exceeds"),
        (["sampler.max_batch_size=4", "algo.group_size=8"], r"one whole group"),
        (["network.scored_addr=tcp://127.0.0.1:5555"], r"network\.scored_addr and network\.work_addr"),
        (["algo.icepop_low=6"], r"icepop_low"),
        (["staleness.routing_replay=r3", "sampler.capture_routes=false"], r"R3 replays the sampler's routes"),
        (['sampler.sglang.extra_args={tp_size = 2}'], r"use sampler\.sglang\.tp_size instead"),
        (["sampler.engine=sglang", "sampler.top_p=0.9"], r"SGLang reports untruncated log-probs.*truncated mass"),
        (["sampler.engine=sglang", "sampler.top_k=20"], r"SGLang reports untruncated log-probs.*truncated mass"),
    ],
)
def test_cross_field_checks(overrides: list[str], pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_round_trip_through_toml(tmp_path: Path) -> None:
    cfg = load_config(ROOT / "configs" / "tiny.toml", ["staleness.r3_kl_threshold=0.01", "learner.betas=[0.8, 0.95]"])
    out = tmp_path / "resolved.toml"
    save_config(cfg, out)
    again = load_config(out)
    assert again == cfg
    assert again.learner.betas == (0.8, 0.95)
    # None (the default of r3_kl_threshold) survives the round trip too.
    save_config(Config(), out)
    assert load_config(out) == Config()


def test_every_config_file_in_repo_loads() -> None:
    files = sorted((ROOT / "configs").glob("*.toml"))
    assert files, "no config files found"
    for f in files:
        load_config(f)


def test_every_field_documented() -> None:
    undocumented = [key for key, _, doc in describe() if not doc]
    assert not undocumented, f"fields without a docstring: {undocumented}"


def test_num_minibatches() -> None:
    assert load_config(None, ["learner.groups_per_step=8", "learner.minibatch_groups=2"]).num_minibatches == 4
