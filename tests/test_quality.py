"""The package stays typed and lint-clean: mypy (strict) and ruff run as part of the suite."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_mypy_strict_on_the_package() -> None:
    """`mypy resilient_dspy` reports no error (strict, per pyproject)."""
    result = _run("mypy", "resilient_dspy")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]


def test_ruff_lint_and_format() -> None:
    """`ruff check` and `ruff format --check` pass on the whole repository."""
    lint = _run("ruff", "check", ".")
    assert lint.returncode == 0, lint.stdout[-3000:]
    formatted = _run("ruff", "format", "--check", ".")
    assert formatted.returncode == 0, formatted.stdout[-3000:]
