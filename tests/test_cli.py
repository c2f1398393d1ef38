"""The ``resilient-dspy`` command on bad input: exit 2 and one clear line on stderr, never a traceback.

The commands run in a subprocess (bounded by a timeout) as a user would run them; argument errors run in-process.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import resilient_dspy
from resilient_dspy.cli import main

pytestmark = pytest.mark.looptime(False)  # real subprocesses and sockets

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "PYTHONPATH": str(ROOT)}

TARGETS = """
import dspy
from resilient_dspy import Pipeline, Retry

program = dspy.Predict("question -> answer")


def no_key():
    raise RuntimeError("OPENAI_API_KEY is not set")


def bad_settings():
    return Pipeline(dspy.Predict("question -> answer"), Retry(0))
"""


def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "resilient_dspy.cli", *args],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def assert_one_clear_line(stderr: str) -> str:
    """stderr is a single line naming the command, with no traceback and no internal (underscored) name."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert not re.search(r"(?<![\w-])_[a-z]\w*", lines[0]), lines[0]
    assert lines[0].startswith("resilient-dspy")
    return lines[0]


def test_version_prints_the_package_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"resilient-dspy {resilient_dspy.__version__}"


@pytest.mark.parametrize(
    ("target", "says"),
    [
        ("program", "not a Pipeline"),
        ("no_key", "OPENAI_API_KEY is not set"),
        ("bad_settings", "Retry.max_attempts"),
    ],
)
def test_a_target_that_gives_no_pipeline_exits_2_with_one_line(tmp_path: Path, target: str, says: str) -> None:
    """A DSPy program that is not wrapped, a factory that raises, a factory whose settings are invalid."""
    (tmp_path / "targets.py").write_text(TARGETS)
    result = run("chaos", f"{tmp_path / 'targets.py'}:{target}", "--calls", "1")
    assert result.returncode == 2, result.stderr
    assert says in assert_one_clear_line(result.stderr)
    assert result.stdout == ""


def test_a_port_in_use_exits_2_with_one_line() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run("chaos-server", "--port", str(port))
    assert result.returncode == 2
    line = assert_one_clear_line(result.stderr)
    assert str(port) in line and "in use" in line


def test_a_closed_output_pipe_exits_2_with_one_line() -> None:
    """``resilient-dspy demo --json | head -0``: the reader is gone before the report is written."""
    process = subprocess.Popen(
        [sys.executable, "-m", "resilient_dspy.cli", "demo", "--json", "--questions", "2", "--concurrency", "2"],
        cwd=ROOT,
        env=ENV,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    process.stdout.close()
    try:
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.returncode is None:
            process.kill()
            process.wait()
    assert process.returncode == 2
    assert "output" in assert_one_clear_line(stderr)


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--questions", "x"],
        ["demo", "--questions", "0"],
        ["demo", "--concurrency", "1.5"],
        ["demo", "--chaos", "lots"],
        ["demo", "--chaos", "-1"],
        ["demo", "--seed", "abc"],
        ["chaos-server", "--port", "http"],
        ["chaos-server", "--port", "70000"],
        ["chaos-server", "--max-hang", "soon"],
        ["chaos-server", "--latency", "a,b"],
        ["chaos-server", "--latency", "2,1"],
        ["chaos-server", "--rpm", "many"],
        ["chaos-server", "--fault", "meteor=0.1"],
        ["chaos-server", "--fault", "hang=often"],
        ["chaos", "x:y", "--calls", "some"],
    ],
    ids=" ".join,
)
def test_a_bad_option_value_exits_2_naming_the_option_not_the_parser(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    with pytest.raises(SystemExit) as raised:
        main(args)
    assert raised.value.code == 2
    err = capsys.readouterr().err
    message = err.strip().splitlines()[-1]
    assert "error: argument" in message
    assert not re.search(r"(?<![\w-])_[a-z]\w*", message), message
