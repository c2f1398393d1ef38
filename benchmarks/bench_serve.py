"""Serving: requests/s and p50/p99 of ``POST /v1/predict`` next to a bare FastAPI endpoint, at 1 and 4 workers.

Run ``python benchmarks/bench_serve.py [--quick] [--smoke] [--json out.json] [--write-docs docs/benchmarks.md]``.

Both servers are real uvicorn processes on 127.0.0.1 (free ports, stopped with SIGTERM then SIGKILL, always), up
together, with the same program, ``async def echo(question): return question`` (no latency, so the figures are
the HTTP stack's cost): ``resilient-dspy serve`` on a config of just that program (defaults: API-key auth, body
limits, request ids, access log), and a bare FastAPI app whose endpoint awaits the program and returns its output.
An ``httpx.AsyncClient`` in this process sends a fixed number of requests with bounded concurrency; each round hits
both servers, order swapped every round. Requests/s is requests over the round's wall time; latency percentiles are
over every request of every round; the ratio is the median of per-round ``ours / bare`` requests/s. The client
shares the machine with the servers, so on a small box the figures are a floor for both.

No ``from __future__ import annotations`` here: FastAPI must see the bare endpoint's body model, a local class.
"""

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from docs_section import write_section  # noqa: E402

KEY = "bench-secret"
MARK = "<!-- bench_serve.py: this section is written by `python benchmarks/bench_serve.py --write-docs` -->"
END = "<!-- /bench_serve.py -->"


async def echo(question: str) -> str:
    return question


def bare_app() -> Any:
    """The baseline: a FastAPI endpoint that awaits the program directly (uvicorn ``--factory`` target)."""
    from fastapi import FastAPI
    from pydantic import BaseModel

    class Body(BaseModel):
        question: str

    app = FastAPI()

    @app.post("/v1/predict")
    async def predict(body: Body) -> dict[str, Any]:
        return {"outputs": {"output": await echo(body.question)}}

    return app


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextlib.contextmanager
def server(command: list[str], port: int, env: dict[str, str]) -> Iterator[str]:
    """Start ``command`` (listening on ``port``), wait for it to answer, yield its URL; always stop it."""
    import httpx

    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"server exited: {process.stderr.read().decode()[-2000:]}")  # type: ignore[union-attr]
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.post(f"{url}/v1/predict", json={"question": "up"}, headers=auth(), timeout=1).status_code
                    == 200
                ):
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command} did not start within 90 s")
            time.sleep(0.1)
        yield url
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        if process.stderr is not None:
            process.stderr.close()


def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {KEY}"}


async def load(url: str, requests: int, concurrency: int) -> tuple[float, list[float]]:
    """Send ``requests`` POSTs, at most ``concurrency`` at once; return requests/s and each latency in ms."""
    import httpx

    latencies: list[float] = []
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30, headers=auth()) as client:

        async def worker() -> None:
            for index in todo:
                started = time.perf_counter()
                reply = await client.post("/v1/predict", json={"question": f"q{index}"})
                latencies.append((time.perf_counter() - started) * 1000)
                if reply.status_code != 200:
                    raise RuntimeError(f"{url}: status {reply.status_code}: {reply.text[:200]}")

        started = time.perf_counter()
        async with asyncio.TaskGroup() as group:
            for _ in range(concurrency):
                group.create_task(worker())
        wall = time.perf_counter() - started
    return requests / wall, latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def measure(workers: int, requests: int, concurrency: int, rounds: int, workdir: Path) -> dict[str, Any]:
    """Both servers at ``workers`` processes, measured in alternating rounds."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "RESILIENT_DSPY_SERVE_API_KEYS": f"bench={KEY}",
    }
    config = workdir / "stack.toml"
    config.write_text('[program]\nmodule = "bench_serve:echo"\n')
    ours_port, bare_port = free_port(), free_port()
    ours_cmd = [sys.executable, "-m", "resilient_dspy.cli", "serve", "--config", str(config)]
    ours_cmd += ["--port", str(ours_port), "--workers", str(workers), "--grace", "2"]
    bare_cmd = [sys.executable, "-m", "uvicorn", "bench_serve:bare_app", "--factory", "--host", "127.0.0.1"]
    bare_cmd += ["--port", str(bare_port), "--workers", str(workers), "--no-access-log", "--log-level", "warning"]
    runs: dict[str, list[float]] = {"ours": [], "bare": []}
    latencies: dict[str, list[float]] = {"ours": [], "bare": []}
    with server(ours_cmd, ours_port, env) as ours_url, server(bare_cmd, bare_port, env) as bare_url:
        urls = {"ours": ours_url, "bare": bare_url}
        for url in urls.values():  # warm-up: every worker's first requests
            asyncio.run(load(url, max(concurrency, requests // 5), concurrency))
        for round_ in range(rounds):
            order = ["ours", "bare"] if round_ % 2 == 0 else ["bare", "ours"]
            for name in order:
                rate, times = asyncio.run(load(urls[name], requests, concurrency))
                runs[name].append(rate)
                latencies[name].extend(times)
    result: dict[str, Any] = {"workers": workers, "requests": requests, "concurrency": concurrency, "rounds": rounds}
    for name in ("ours", "bare"):
        result[name] = {
            "rps": statistics.median(runs[name]),
            "p50_ms": percentile(latencies[name], 0.50),
            "p99_ms": percentile(latencies[name], 0.99),
            "rounds_rps": runs[name],
        }
    result["ratio"] = statistics.median(o / b for o, b in zip(runs["ours"], runs["bare"], strict=True))
    return result


def markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        MARK,
        "",
        "## Serving: `POST /v1/predict` (`bench_serve.py`)",
        "",
        f"Run {report['when']} · `{report['command']}` · {report['seconds']:.1f} s · {report['machine']}",
        "",
        "`resilient-dspy serve` on a config of one no-latency program (`async def echo(question)`, no layers; "
        "defaults: API-key auth, body limits, request ids, access log) next to a bare FastAPI endpoint awaiting "
        "the same program, both real uvicorn processes on 127.0.0.1, measured in alternating rounds by one "
        "`httpx.AsyncClient` on the same machine (requests/s: median over rounds; p50/p99 over every request; "
        "ratio: median of per-round ours / bare):",
        "",
        "| workers | requests x rounds | concurrency | ours req/s | bare req/s | ours / bare | ours p50 / p99 ms "
        "| bare p50 / p99 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["runs"]:
        ours, bare = row["ours"], row["bare"]
        lines.append(
            f"| {row['workers']} | {row['requests']:,} x {row['rounds']} | {row['concurrency']} | {ours['rps']:,.0f} "
            f"| {bare['rps']:,.0f} | {row['ratio']:.2f}x | {ours['p50_ms']:.1f} / {ours['p99_ms']:.1f} "
            f"| {bare['p50_ms']:.1f} / {bare['p99_ms']:.1f} |"
        )
    lines += ["", END]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer requests and rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one worker: checks the script runs")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--write-docs", type=Path, help="replace this script's section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.smoke:
        requests, concurrency, rounds, workers = 40, 4, 1, (1,)
    elif args.quick:
        requests, concurrency, rounds, workers = 500, 16, 3, (1, 4)
    else:
        requests, concurrency, rounds, workers = 2_000, 32, 5, (1, 4)
    import dspy

    started = time.perf_counter()
    shown = [a for a in sys.argv[1:] if a != "--json" and not a.endswith(".json")]
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as workdir:
        runs = [measure(n, requests, concurrency, rounds, Path(workdir)) for n in workers]
    report = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/bench_serve.py", *shown]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, dspy {dspy.__version__}",
        "runs": runs,
        "seconds": time.perf_counter() - started,
    }
    lines = markdown(report)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write_docs:
        write_section(args.write_docs, MARK, END, lines)
        print(f"Wrote {args.write_docs}")


if __name__ == "__main__":
    main()
