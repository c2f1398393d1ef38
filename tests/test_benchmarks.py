"""Smoke test of the benchmark scripts: each runs at tiny sizes and exits 0 with some output.

Nothing here times anything or checks a figure: the scripts measure, the tests only make sure they still run
after the library changes (they read some private attributes). A script runs with ``--smoke`` when it offers
it, else ``--quick``. Peers that are not installed are skipped by ``bench_peers.py`` itself, which says so.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(s for s in BENCHMARKS.glob("bench_*.py") if s.name != "bench_real_model.py")
"""bench_real_model.py is left out: it needs the real-model extra and runs minutes (docs/guides/real-models.md)."""


def _flag(script: Path) -> str:
    return "--smoke" if "--smoke" in script.read_text() else "--quick"


def _needs_redis(script: Path) -> bool:
    """A benchmark on Redis runs only with a server to be had (``RESILIENT_DSPY_REDIS_URL`` or ``redis-server``)."""
    return "redis" in script.stem and not (os.environ.get("RESILIENT_DSPY_REDIS_URL") or shutil.which("redis-server"))


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.stem for s in SCRIPTS])
def test_benchmark_runs(script: Path, tmp_path: Path) -> None:
    if _needs_redis(script):
        pytest.skip("no Redis server: set RESILIENT_DSPY_REDIS_URL or install redis-server")
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "DSPY_CACHEDIR": str(tmp_path / "dspy-cache")}
    completed = subprocess.run(
        [sys.executable, str(script), _flag(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip(), "the script printed nothing"


def test_every_script_is_covered() -> None:
    assert {s.name for s in SCRIPTS} >= {
        "bench_overhead.py",
        "bench_peers.py",
        "bench_limiter.py",
        "bench_cache.py",
        "bench_redis_cache.py",
        "bench_redis.py",
        "bench_redis_state.py",
        "bench_hedge.py",
    }
