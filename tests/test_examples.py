"""Every script in examples/ runs to completion and prints what its docstring says it prints.

Each example's module docstring ends with an ``Expected output::`` block (indented); it is compared with the real
stdout as the docs examples are (``...`` stands for any text: latencies, long answers).
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

from tests.test_docs import check_output, run_python

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.py"))


def expected_output(script: Path) -> str | None:
    """The indented block after ``Expected output...::`` in the script's module docstring, dedented."""
    docstring = ast.get_docstring(ast.parse(script.read_text())) or ""
    _, marker, block = docstring.partition("::\n")
    if not marker or "Expected output" not in docstring.split("::\n")[0].splitlines()[-1]:
        return None
    return textwrap.dedent(block)


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda p: p.name)
def test_example_prints_its_expected_output(script: Path, tmp_path: Path) -> None:
    """The example exits 0 and prints what its docstring's ``Expected output::`` block shows."""
    expected = expected_output(script)
    assert expected is not None, f"{script.name} states no 'Expected output::' in its docstring"
    check_output(expected, run_python([str(script)], tmp_path), script.name)


def test_examples_exist() -> None:
    """The examples folder is not silently empty."""
    assert len(EXAMPLES) >= 3
