"""Loading graders: built-in names, a custom grader from a module in a temporary directory (by file path
and by module name on sys.path), kwargs, and clear start-up errors naming the path."""

from __future__ import annotations

import asyncio
import textwrap
from pathlib import Path

import pytest

from minirl_async.config import load_config
from minirl_async.graders.base import GradeResult, GraderLoadError, Sample, load_grader
from minirl_async.graders.runner import GraderRunner

CUSTOM = textwrap.dedent('''
    from minirl_async.graders.base import GradeResult

    def length_reward(sample, target=3):
        return 1.0 if len(sample.response_text) == target else 0.0

    async def async_contains(sample):
        return GradeResult(float(sample.meta["answer"] in sample.response_text), {"custom": True})

    class Prefix:
        def __init__(self, prefix):
            self.prefix = prefix
        def __call__(self, sample):
            return sample.response_text.startswith(self.prefix)

    NOT_CALLABLE = 3
''')


@pytest.fixture
def module_file(tmp_path: Path) -> Path:
    path = tmp_path / "my_rewards.py"
    path.write_text(CUSTOM)
    return path


def test_custom_grader_loaded_by_path_and_used(module_file: Path) -> None:
    cfg = load_config(None, [f"grader.name={module_file}:async_contains", "grader.failure_policy=zero"])
    runner = GraderRunner.from_config(cfg.grader)
    samples = [Sample("q", "it is 42", {"answer": "42"}), Sample("q", "it is 41", {"answer": "42"})]
    res = asyncio.run(runner.grade_group(samples))
    assert res.rewards == [1.0, 0.0] and res.infos[0] == {"custom": True} and not res.dropped


def test_custom_grader_by_module_name_with_kwargs(module_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(module_file.parent))
    g = load_grader("my_rewards:length_reward", {"target": 2})
    assert g(Sample("q", "ab")) == 1.0 and g(Sample("q", "abc")) == 0.0
    cls_grader = load_grader("my_rewards:Prefix", {"prefix": "ok"})
    assert cls_grader(Sample("q", "okay")) is True


@pytest.mark.parametrize("spec,match", [
    ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz'"),
    ("/nonexistent/dir/rewards.py:f", "/nonexistent/dir/rewards.py"),
    ("{file}:missing", "has no attribute 'missing'"),
    ("{file}:NOT_CALLABLE", "not a callable"),
    ("exactly", "neither a built-in"),
])
def test_load_errors_name_the_path(spec: str, match: str, module_file: Path) -> None:
    with pytest.raises(GraderLoadError, match=match):
        load_grader(spec.format(file=module_file))


def test_module_that_fails_to_import(tmp_path: Path) -> None:
    bad = tmp_path / "broken.py"
    bad.write_text("import definitely_not_installed_pkg\n")
    with pytest.raises(GraderLoadError, match=r"broken\.py.*ModuleNotFoundError"):
        load_grader(f"{bad}:f")


def test_bad_kwargs_for_builtin_and_class(module_file: Path) -> None:
    with pytest.raises(GraderLoadError, match="bad grader.kwargs"):
        load_grader("exact", {"no_such_option": 1})
    with pytest.raises(GraderLoadError, match="cannot construct Prefix"):
        load_grader(f"{module_file}:Prefix", {})


def test_builtins_load() -> None:
    for name in ("exact", "numeric", "math", "code"):
        assert callable(load_grader(name))
    out = load_grader("exact")(Sample("q", "####5", {"answer": "5"}))
    assert isinstance(out, GradeResult) and out.reward == 1.0
