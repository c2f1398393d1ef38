"""Per-call overhead of the CircuitBreaker, the Budget and the Retry budget on a RedisStore next to in memory.

Run ``python benchmarks/bench_redis_state.py [--url redis://127.0.0.1:6379/0] [--calls 2000] [--smoke]``. Without
``--url`` (or ``RESILIENT_DSPY_REDIS_URL``) it starts a ``redis-server`` of its own on a free loopback port, and says
so and exits 0 when there is none. For each layer, ``Pipeline(program, layer)`` runs ``--calls`` sequential calls of
a program that does nothing, in memory and on the store; the figure is the time per call minus a bare
``Pipeline(program)``'s (paired per round, median of rounds), so it is the layer's own cost, round trips included.
Round trips are counted twice: the store's steps per call (a wrapper around ``RedisStore.run``) and the server's
``EVALSHA`` count from ``INFO commandstats`` over the same calls. On a busy machine the round trip itself varies
from run to run, so each round also times an empty step (``return 1``): "÷ empty" is the layer's cost in such round
trips, measured side by side; "server µs/step" is the server's own time per step (``usec_per_call``). The calls
succeed: a closed circuit, a budget far from its cap, no retry — the uncontended path.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from resilient_dspy import CircuitBreaker, Pipeline, RedisStore, Retry
from resilient_dspy.middleware.budget import Budget


async def program(question: str) -> str:
    return "answer"


class Counted(RedisStore):
    """A RedisStore that counts its steps (one step = one EVALSHA round trip)."""

    steps = 0

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any], *, operation: str) -> Any:
        Counted.steps += 1
        return await super().run(script, keys, args, operation=operation)


LAYERS: dict[str, Callable[[RedisStore | None], Any]] = {
    "CircuitBreaker (consecutive)": lambda store: CircuitBreaker(5, store=store, name="bench"),
    "CircuitBreaker (count window)": lambda store: CircuitBreaker(
        failure_rate=0.5, window=100, store=store, name="bench-window"
    ),
    "Budget (tokens)": lambda store: Budget(tokens=10**12, estimate_tokens=lambda call: 100, store=store, name="bench"),
    "Retry (budget)": lambda store: Retry(3, store=store, name="bench"),
}


async def per_call(pipeline: Pipeline, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        await pipeline("q")
    return (time.perf_counter() - started) / calls


async def evalsha_stats(store: RedisStore) -> tuple[int, float]:
    """The server's EVALSHA count and its mean time inside the server (µs), since the last CONFIG RESETSTAT."""
    stats = (await store.client.info("commandstats")).get("cmdstat_evalsha", {})
    return int(stats.get("calls", 0)), float(stats.get("usec_per_call", 0.0))


async def bare_step(url: str, calls: int) -> float:
    """µs of one store step that does nothing (``return 1``): the round trip every step pays."""
    store = RedisStore(url, prefix="bench", timeout=2.0)
    try:
        await store.run("return 1", [], [], operation="ping")
        started = time.perf_counter()
        for _ in range(calls):
            await store.run("return 1", [], [], operation="ping")
        return (time.perf_counter() - started) / calls * 1e6
    finally:
        await store.aclose()


async def measure(url: str, calls: int, rounds: int) -> list[dict[str, Any]]:
    step = await bare_step(url, calls)
    rows: list[dict[str, Any]] = [
        {
            "layer": "one empty step (return 1)",
            "memory_us": 0.0,
            "redis_us": step,
            "steps_per_call": 1.0,
            "evalsha_per_call": 1.0,
            "empty_steps": 1.0,
            "server_us": 0.0,
        }
    ]
    for label, build in LAYERS.items():
        store = Counted(url, prefix=f"bench-{uuid.uuid4().hex[:8]}", timeout=2.0)
        bare = Pipeline(program)
        memory = Pipeline(program, build(None))
        shared = Pipeline(program, build(store))
        await per_call(shared, 10)  # warm: scripts loaded, connections open
        memory_us, shared_us, in_steps = [], [], []
        for _ in range(rounds):
            base = await per_call(bare, calls)
            memory_us.append((await per_call(memory, calls) - base) * 1e6)
            base = await per_call(bare, calls)
            shared_us.append((await per_call(shared, calls) - base) * 1e6)
            in_steps.append(shared_us[-1] / await bare_step(url, calls))  # the same round's empty round trip
        Counted.steps = 0
        await store.client.config_resetstat()
        await per_call(shared, calls)
        server, server_us = await evalsha_stats(store)
        rows.append(
            {
                "layer": label,
                "memory_us": statistics.median(memory_us),
                "redis_us": statistics.median(shared_us),
                "steps_per_call": Counted.steps / calls,
                "evalsha_per_call": server / calls,
                "empty_steps": statistics.median(in_steps),
                "server_us": server_us,
            }
        )
        await store.aclose()
    return rows


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server() -> tuple[subprocess.Popen[bytes], str, str] | None:
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    port, workdir = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    process = subprocess.Popen(
        [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return process, f"redis://127.0.0.1:{port}/0", workdir
        except OSError:
            time.sleep(0.05)
    process.kill()
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("RESILIENT_DSPY_REDIS_URL"))
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    args = parser.parse_args()
    calls, rounds = (20, 1) if args.smoke else (args.calls, args.rounds)
    started = None
    url = args.url
    if url is None:
        started = start_server()
        if started is None:
            print("skipped: no redis-server (give --url or install redis-server)")
            return 0
        url = started[1]
    try:
        rows = asyncio.run(measure(url, calls, rounds))
    finally:
        if started is not None:
            started[0].terminate()
            started[0].wait(timeout=10)
            shutil.rmtree(started[2], ignore_errors=True)
    print(f"Python {sys.version.split()[0]}, {calls} sequential calls x {rounds} rounds, server on loopback")
    head = f"{'layer':32} {'memory µs':>10} {'redis µs':>10} {'steps/call':>11} {'EVALSHA/call':>13}"
    print(f"{head} {'÷ empty':>8} {'server µs/step':>15}")
    for row in rows:
        print(
            f"{row['layer']:32} {row['memory_us']:10.1f} {row['redis_us']:10.1f} "
            f"{row['steps_per_call']:11.2f} {row['evalsha_per_call']:13.2f} "
            f"{row['empty_steps']:8.2f} {row['server_us']:15.1f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
