"""A real uvicorn process on 127.0.0.1 driven with httpx: auth, per-key limits, error mapping, readiness flipping
when the fault LM opens the breaker, drain on SIGTERM, and a bounded load test."""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import threading
import time
from pathlib import Path

import httpx

from tests.serve.server import HEADERS, serving

PROGRAMS = "tests.serve.programs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "stack.toml"
    path.write_text(text)
    return path


def test_auth_limits_and_error_mapping_over_http(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        f"""
[program]
module = "{PROGRAMS}:broken"

[[layers]]
layer = "RateLimiter"
requests = 3
per = 60.0
max_wait = 0.01
key = "resilient_dspy:by_partition_key"
""",
    )
    with serving(config) as (url, _):
        assert httpx.post(f"{url}/v1/predict", json={"question": "a"}).status_code == 401
        ok = httpx.post(f"{url}/v1/predict", json={"question": "a"}, headers=HEADERS)
        assert ok.status_code == 200 and ok.json()["outputs"] == {"output": "a"}
        assert httpx.post(f"{url}/v1/predict", json={"questio": "a"}, headers=HEADERS).status_code == 422
        failed = httpx.post(f"{url}/v1/predict", json={"question": "boom"}, headers=HEADERS)
        assert failed.status_code == 500 and "secret" not in failed.text
        limited = httpx.post(f"{url}/v1/predict", json={"question": "limited"}, headers=HEADERS)
        assert limited.status_code == 429 and limited.headers["Retry-After"] == "3"
        refused = httpx.post(f"{url}/v1/predict", json={"question": "a"}, headers=HEADERS)
        assert refused.status_code == 429 and int(refused.headers["Retry-After"]) >= 1


def test_readiness_flips_while_the_fault_lm_holds_the_breaker_open(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        """
[program]
signature = "question -> answer"
lm = { kind = "FaultInjectingLM", script = ["server_error", "server_error"] }

[[layers]]
layer = "CircuitBreaker"
failure_threshold = 2
break_duration = 1.5
""",
    )
    with serving(config) as (url, _):
        assert httpx.get(f"{url}/readyz").status_code == 200
        for _ in range(2):
            assert httpx.post(f"{url}/v1/predict", json={"question": "q"}, headers=HEADERS).status_code == 500
        assert httpx.get(f"{url}/readyz").status_code == 503
        rejected = httpx.post(f"{url}/v1/predict", json={"question": "q"}, headers=HEADERS)
        assert rejected.status_code == 503 and "Retry-After" in rejected.headers
        time.sleep(1.7)
        assert httpx.get(f"{url}/readyz").status_code == 200
        assert httpx.post(f"{url}/v1/predict", json={"question": "q"}, headers=HEADERS).status_code == 200


def test_sigterm_lets_in_flight_requests_finish(tmp_path: Path) -> None:
    config = write(tmp_path, f'[program]\nmodule = "{PROGRAMS}:slow"\n')
    with serving(config, grace=10) as (url, process):
        answers: list[httpx.Response] = []
        worker = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/predict", json={"question": "1.5"}, headers=HEADERS, timeout=20)
            )
        )
        worker.start()
        time.sleep(0.5)
        process.send_signal(signal.SIGTERM)
        worker.join(timeout=20)
        assert answers and answers[0].status_code == 200 and answers[0].json()["outputs"] == {"output": "slept 1.5"}
        assert process.wait(timeout=15) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained


FULL_LOAD = os.environ.get("RESILIENT_DSPY_FULL_LOAD") == "1"
REQUESTS, CONCURRENCY = (2000, 200) if FULL_LOAD else (600, 60)
"""The issue's 2,000 requests at 200 concurrent with ``RESILIENT_DSPY_FULL_LOAD=1`` (about a minute on 2 cores);
the default run keeps a third of it, so the suite stays within its time."""


def test_a_bounded_load_with_injected_faults_loses_nothing(tmp_path: Path) -> None:
    config = write(
        tmp_path,
        f"""
[program]
module = "{PROGRAMS}:echo"

[[layers]]
layer = "Chaos"
fault = "server_error"
rate = 0.1
seed = 1
""",
    )

    async def load(url: str) -> tuple[list[int], list[float]]:
        statuses: list[int] = []
        latencies: list[float] = []
        gate = asyncio.Semaphore(CONCURRENCY)
        limits = httpx.Limits(max_connections=CONCURRENCY)
        async with httpx.AsyncClient(base_url=url, headers=HEADERS, timeout=30, limits=limits) as client:

            async def one(index: int) -> None:
                async with gate:
                    started = time.perf_counter()
                    answer = await client.post("/v1/predict", json={"question": str(index)})
                    latencies.append(time.perf_counter() - started)
                    statuses.append(answer.status_code)

            await asyncio.gather(*(one(i) for i in range(REQUESTS)))
        return statuses, latencies

    with serving(config) as (url, _):
        statuses, latencies = asyncio.run(load(url))
    assert len(statuses) == REQUESTS
    assert set(statuses) <= {200, 500}
    assert 0 < statuses.count(500) < REQUESTS * 0.2
    p99 = statistics.quantiles(latencies, n=100)[98]
    print(f"\n{REQUESTS} requests, {CONCURRENCY} concurrent: {statuses.count(500)} faults, p99 {p99 * 1000:.1f} ms")


def test_serve_with_a_bad_config_exits_2_listing_the_problem(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.serve.server import ROOT

    config = write(tmp_path, '[program]\nsignature = "q -> a"\n\n[[layers]]\nlayer = "Bulkhead"\nmax_concurrent = 0\n')
    result = subprocess.run(
        [sys.executable, "-m", "resilient_dspy.cli", "serve", "--config", str(config), "--no-auth"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "layers[0].max_concurrent" in result.stderr
