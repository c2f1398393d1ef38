"""Documented examples run: every pattern page's Usage block, the README quickstart, concept pages."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [*sorted((ROOT / "docs" / "patterns").glob("*.md")), ROOT / "docs" / "observability.md"]


def usage_block(page: Path) -> str | None:
    text = page.read_text()
    section = re.search(r"^## Usage\n(.*?)(?=^## )", text, re.S | re.M)
    if section is None:
        return None
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    return block.group(1) if block else None


def run_block(code: str, tmp_path: Path) -> None:
    script = tmp_path / "usage.py"
    script.write_text(code)
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DSPY_CACHEDIR": str(tmp_path / "dspy-cache")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip()


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_usage_example_runs(page: Path, tmp_path: Path) -> None:
    """Each page has a Usage example and it exits 0 with some output."""
    code = usage_block(page)
    assert code is not None, f"{page.name} has no python block under '## Usage'"
    run_block(code, tmp_path)


@pytest.mark.parametrize(
    "page",
    [
        ROOT / "README.md",
        ROOT / "docs" / "concepts" / "traces.md",
        ROOT / "docs" / "concepts" / "health.md",
        ROOT / "docs" / "concepts" / "order-of-layers.md",
    ],
    ids=lambda p: p.name,
)
def test_first_example_of_page_runs(page: Path, tmp_path: Path) -> None:
    """The README quickstart and the concept pages' examples run as written."""
    block = re.search(r"```python\n(.*?)```", page.read_text(), re.S)
    assert block is not None
    run_block(block.group(1), tmp_path)
