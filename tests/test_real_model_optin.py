"""The real-model suite is opt-in: the CI command (``python -m pytest``) deselects it, ``-m real_model`` selects it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def collect(*extra: str) -> str:
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/real_model"]
    completed = subprocess.run([*command, *extra], cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    return completed.stdout


def test_the_default_run_deselects_the_real_model_suite() -> None:
    output = collect()
    assert "test_real_model.py::" not in output
    assert "deselected" in output


def test_the_marker_selects_it() -> None:
    assert "test_real_model.py::test_the_recommended_stack" in collect("-m", "real_model")
