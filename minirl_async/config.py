"""The typed configuration tree: defaults < TOML file < dotted `key.sub=value` overrides.

One section per process or concern (model, sampler, grader, learner, algo, staleness, data, run, network),
defined in config_sections.py and re-exported here. Every field has a docstring (pydantic turns them into descriptions). Unknown keys are an error that names the
key, the file and the closest valid key; wrong types name the key and the file; cross-field checks run at load.

    cfg = load_config("configs/tiny.toml", ["learner.lr=1e-4", "staleness.max_staleness=0"])
    save_config(cfg, "runs/x/config.toml")   # round-trips: load_config(path) == cfg
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any

import tomli_w
from pydantic import BaseModel, Field, ValidationError, model_validator

from minirl_async.config_sections import (
    AlgoSection,
    DataSection,
    GraderSection,
    LearnerSection,
    ModelArch,
    ModelSection,
    NetworkSection,
    RunSection,
    SamplerSection,
    SFTSection,
    SGLangSection,
    StalenessSection,
    _Section,
)

__all__ = [
    "AlgoSection", "Config", "ConfigError", "DataSection", "GraderSection", "LearnerSection", "ModelArch",
    "ModelSection", "NetworkSection", "RunSection", "SFTSection", "SGLangSection", "SamplerSection",
    "StalenessSection", "config_to_dict", "describe", "load_config", "save_config",
]


class ConfigError(ValueError):
    """A configuration the user must change; the message says what and where."""


class Config(_Section):
    """The whole configuration of a run."""

    model: ModelSection = Field(default_factory=ModelSection)
    """Policy model."""
    sampler: SamplerSection = Field(default_factory=SamplerSection)
    """Sampler processes and their engine."""
    grader: GraderSection = Field(default_factory=GraderSection)
    """Grader processes and the reward function."""
    learner: LearnerSection = Field(default_factory=LearnerSection)
    """Learner (trainer and controller)."""
    algo: AlgoSection = Field(default_factory=AlgoSection)
    """MiniRL loss and its variants."""
    staleness: StalenessSection = Field(default_factory=StalenessSection)
    """Staleness bound and routing replay."""
    data: DataSection = Field(default_factory=DataSection)
    """Prompts, tasks and cold start."""
    run: RunSection = Field(default_factory=RunSection)
    """Run directory and supervision."""
    network: NetworkSection = Field(default_factory=NetworkSection)
    """ZeroMQ addresses and transport limits."""

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        lr, al, arch = self.learner, self.algo, self.model.arch
        if lr.groups_per_step % lr.minibatch_groups != 0:
            raise ValueError(
                f"learner.groups_per_step ({lr.groups_per_step}) must be a multiple of "
                f"learner.minibatch_groups ({lr.minibatch_groups})"
            )
        if al.group_size < 2:
            raise ValueError(
                f"algo.group_size is {al.group_size}: a group baseline needs at least 2 responses per prompt"
            )
        if arch.num_attention_heads % arch.num_key_value_heads != 0:
            raise ValueError(
                f"model.arch.num_key_value_heads ({arch.num_key_value_heads}) must divide "
                f"model.arch.num_attention_heads ({arch.num_attention_heads})"
            )
        if arch.num_experts_per_tok > arch.num_experts:
            raise ValueError(
                f"model.arch.num_experts_per_tok ({arch.num_experts_per_tok}) exceeds "
                f"model.arch.num_experts ({arch.num_experts})"
            )
        if al.icepop_low >= al.icepop_high:
            raise ValueError("algo.icepop_low must be below algo.icepop_high")
        # Admission: with G responses per group each sampler batch needs at least one whole group.
        if self.sampler.max_batch_size < al.group_size:
            raise ValueError(
                f"sampler.max_batch_size ({self.sampler.max_batch_size}) must hold one whole group "
                f"(algo.group_size = {al.group_size})"
            )
        owned = sorted({"tp_size", "model_path"} & set(self.sampler.sglang.extra_args))
        if owned:
            raise ValueError(f"sampler.sglang.extra_args sets {owned}: use sampler.sglang.{owned[0]} instead (the "
                             "deploy scripts and the folder check read it from there)")
        sp = self.sampler
        if sp.engine == "sglang" and (sp.top_p < 1 or sp.top_k > 0):
            raise ValueError(f"sampler.engine = 'sglang' with sampler.top_p = {sp.top_p}, sampler.top_k = {sp.top_k}: "
                             "SGLang reports untruncated log-probs, so the train-inference IS weight would be off "
                             "by the truncated mass; set top_p = 1 and top_k = 0, or use sampler.engine = "
                             "'torch_fp8' (records the log-prob of the truncated distribution)")
        if self.staleness.routing_replay == "r3" and not self.sampler.capture_routes:
            raise ValueError("staleness.routing_replay = 'r3' but sampler.capture_routes = false: R3 replays the "
                             "sampler's routes; capture them, or use 'auto' (R2 when routes are missing) or 'r2'")
        addrs = {
            "work_addr": self.network.work_addr,
            "weights_addr": self.network.weights_addr,
            "rollout_addr": self.network.rollout_addr,
            "scored_addr": self.network.scored_addr,
        }
        seen: dict[str, str] = {}
        for key, addr in addrs.items():
            if addr in seen:
                raise ValueError(f"network.{key} and network.{seen[addr]} are both {addr!r}; give each its own")
            seen[addr] = key
        return self

    @property
    def num_minibatches(self) -> int:
        """N: optimizer updates per global step."""
        return self.learner.groups_per_step // self.learner.minibatch_groups


# ---------------------------------------------------------------------------------------------------------
# Loading


def _check_keys(raw: dict[str, Any], model: type[BaseModel], prefix: str, source: str) -> None:
    """Reject unknown keys with the closest valid one (before pydantic, for a friendlier message)."""
    fields = model.model_fields
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.5)
            leaves = [f"{sec}.{key}" for sec, f in fields.items() if isinstance(f.annotation, type)
                      and issubclass(f.annotation, BaseModel) and key in f.annotation.model_fields]
            hint = (f"; did you mean '{prefix}{close[0]}'?" if close else
                    f"; did you mean '{prefix}{leaves[0]}'?" if leaves else f"; valid keys: {', '.join(fields)}")
            raise ConfigError(f"{source}: unknown config key '{path}'{hint}")
        ann = fields[key].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{path}' is a section; expected a table, got {value!r}")
            _check_keys(value, ann, f"{path}.", source)


def _annotation(keys: list[str]) -> Any:
    """The type annotation of the config field at `keys` (None if there is no such field)."""
    model: Any = Config
    for k in keys[:-1]:
        f = model.model_fields.get(k)
        model = f.annotation if f is not None else None
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return None
    f = model.model_fields.get(keys[-1])
    return f.annotation if f is not None else None


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text  # bare strings need no quotes on the command line
    keys = key.split(".")
    if _annotation(keys) is str and not isinstance(value, str):
        value = text  # a string field takes the text as typed: run.dir=2024 or 2024-06-01 is a name, not a number
    return keys, value


def _merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults < TOML file at `path` < `key.sub=value` overrides. Raises ConfigError with a clear message."""
    raw: dict[str, Any] = {}
    source = "defaults"
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{p}: not valid TOML: {e}") from e
        source = str(p)
        _check_keys(raw, Config, "", source)
    for item in overrides or []:
        keys, value = _parse_override(item)
        tree: dict[str, Any] = {}
        node = tree
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
        _check_keys(tree, Config, "", f"override {item!r}")
        _merge(raw, tree)
        source = f"{source} + overrides" if "overrides" not in source else source
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            where = f"'{loc}'" if loc else "config"
            lines.append(f"{where}: {err['msg']} (got {err.get('input')!r})" if loc else err["msg"])
        raise ConfigError(f"{source}: invalid config: " + "; ".join(lines)) from None


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A TOML-serialisable dict (None values are dropped: TOML has no null, and None is the default)."""

    def strip(d: Any) -> Any:
        if isinstance(d, dict):
            return {k: strip(v) for k, v in d.items() if v is not None}
        if isinstance(d, tuple):
            return list(d)
        return d

    return strip(cfg.model_dump(mode="python"))


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config; `load_config(path)` gives back an equal Config."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(tomli_w.dumps(config_to_dict(cfg)))


def describe(section: type[BaseModel] = Config, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, doc) for every leaf field, for `--help`-style listings and docs."""
    out = []
    for name, f in section.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out.extend(describe(ann, f"{prefix}{name}."))
        else:
            default = f.get_default(call_default_factory=True)
            out.append((f"{prefix}{name}", repr(default), (f.description or "").strip()))
    return out
