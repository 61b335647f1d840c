"""The Grader protocol and the grader loader.

A grader is a plain callable, sync or async, that receives one `Sample` and returns a float reward or a
`GradeResult(reward, info)`. It is named in the config by a built-in name or an import path:

    [grader]
    name = "exact"                          # built-ins: exact, numeric, math, code
    name = "my_pkg.rewards:score"           # importable module (on PYTHONPATH)
    name = "/path/to/rewards.py:Score"      # a file loaded by path
    kwargs = { tolerance = 1e-3 }

`load_grader(name, kwargs)` resolves it at start-up and raises `GraderLoadError` naming the path when it
cannot be imported, has no such attribute, or is not callable. If the attribute is a class it is
instantiated with `kwargs` (its instances are the grader); a function gets `kwargs` bound as keyword
arguments (`functools.partial`).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from minirl_async.tasks.synthetic import ANSWER_PREFIX


@dataclass
class Sample:
    """What a grader sees of one response."""

    prompt_text: str
    response_text: str
    meta: dict[str, Any] = field(default_factory=dict)
    """Task metadata of the prompt (e.g. {"answer": "42"}, code tests)."""
    prompt_ids: list[int] = field(default_factory=list)
    response_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"
    """'stop' (eos), 'length' (hit max_new_tokens) or 'abort'."""


@dataclass
class GradeResult:
    """A reward with free-form information (logged, e.g. the extracted answer or a test failure)."""

    reward: float
    info: dict[str, Any] = field(default_factory=dict)


GraderOutput = Union[float, int, bool, GradeResult]
Grader = Callable[[Sample], Union[GraderOutput, Awaitable[GraderOutput]]]


class GraderLoadError(ValueError):
    """The configured grader cannot be loaded; the message names the path and what to change."""


def extract_answer(text: str, prefix: str = ANSWER_PREFIX) -> str:
    """The final answer of a response: what follows the last `prefix` if any, else the whole text, stripped."""
    i = text.rfind(prefix) if prefix else -1
    return (text[i + len(prefix):] if i >= 0 else text).strip()


def _builtin(name: str) -> Callable[..., Grader] | None:
    from minirl_async.graders import builtin, code

    table: dict[str, Callable[..., Grader]] = {
        "exact": builtin.ExactGrader, "numeric": builtin.NumericGrader, "math": builtin.MathGrader,
        "code": code.CodeGrader,
    }
    return table.get(name)


BUILTINS = ("exact", "numeric", "math", "code")


def _import_target(module_part: str, spec: str) -> Any:
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part).expanduser().resolve()
        if not path.is_file():
            raise GraderLoadError(f"grader {spec!r}: file {str(path)!r} does not exist")
        mod_name = f"_minirl_grader_{abs(hash(str(path)))}"
        mspec = importlib.util.spec_from_file_location(mod_name, path)
        if mspec is None or mspec.loader is None:
            raise GraderLoadError(f"grader {spec!r}: cannot load {str(path)!r} as a Python module")
        module = importlib.util.module_from_spec(mspec)
        sys.modules[mod_name] = module
        try:
            mspec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[mod_name]
            raise GraderLoadError(f"grader {spec!r}: importing {str(path)!r} failed: {type(e).__name__}: {e}") from e
        return module
    try:
        return importlib.import_module(module_part)
    except ImportError as e:
        raise GraderLoadError(
            f"grader {spec!r}: cannot import module {module_part!r} ({e}); put it on PYTHONPATH or give a "
            "file path like '/path/to/file.py:attr'"
        ) from e
    except Exception as e:
        raise GraderLoadError(f"grader {spec!r}: importing {module_part!r} failed: {type(e).__name__}: {e}") from e


def load_grader(name: str, kwargs: dict[str, Any] | None = None) -> Grader:
    """A built-in name or 'package.module:attr' / '/path/file.py:attr' -> a grader callable."""
    kwargs = dict(kwargs or {})
    factory = _builtin(name)
    if factory is not None:
        try:
            return factory(**kwargs)
        except TypeError as e:
            raise GraderLoadError(f"grader {name!r}: bad grader.kwargs {kwargs}: {e}") from e
    if ":" not in name:
        raise GraderLoadError(
            f"grader {name!r} is neither a built-in ({', '.join(BUILTINS)}) nor of the form "
            "'package.module:attr' or '/path/to/file.py:attr'; set grader.name"
        )
    module_part, attr = name.rsplit(":", 1)
    module = _import_target(module_part, name)
    target: Any = module
    for part in attr.split("."):
        if not hasattr(target, part):
            raise GraderLoadError(f"grader {name!r}: module {module_part!r} has no attribute {attr!r}")
        target = getattr(target, part)
    if inspect.isclass(target):
        try:
            target = target(**kwargs)
        except TypeError as e:
            raise GraderLoadError(f"grader {name!r}: cannot construct {attr} with grader.kwargs {kwargs}: {e}") from e
    elif kwargs:
        target = functools.partial(target, **kwargs)
    if not callable(target):
        raise GraderLoadError(f"grader {name!r}: {attr!r} is a {type(target).__name__}, not a callable")
    return target  # type: ignore[no-any-return]
