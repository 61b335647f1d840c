"""Learner test fixtures; puts this folder on sys.path so tests can `from learner_util import ...`
(pytest runs in importlib mode, where test folders are not importable packages)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from learner_util import tiny_model  # noqa: E402

from minirl_async.models.qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402


@pytest.fixture
def model() -> Qwen3MoeForCausalLM:
    return tiny_model()
