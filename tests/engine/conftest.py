"""Puts this folder on sys.path so the engine tests can `from engine_testkit import ...` (pytest runs in
importlib mode, where test folders are not importable packages)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
