"""What the Cache costs on Redis next to memory: µs and Redis round trips per hit and per miss.

Run ``python benchmarks/bench_redis_cache.py [--quick] [--smoke] [--json out.json]``. It uses the server named by
``RESILIENT_DSPY_REDIS_URL``, else starts ``redis-server`` on a free loopback port for the run (and stops it); with
neither it says so and exits 0.

Batches of sequential awaits of a trivial ``async def`` through ``Pipeline(program, Cache(...))``: variants
interleaved round-robin with the order rotated every round; per-call figures are the median and min over rounds.
A miss asks a fresh question; its store runs in the background on Redis, so "miss" is what the caller waits for and
"miss + store drained" adds the background store. Round trips are the server's own count (``INFO commandstats``:
the EVALSHA, SCRIPT LOAD and PING clients sent, not the commands a script runs inside) over the measured calls.
``PING`` is the floor: one bare round trip from redis-py's asyncio client.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio

from resilient_dspy import Cache, Pipeline
from resilient_dspy.middleware.cache.backends import RedisBackend
from resilient_dspy.store import RedisStore

Runner = Callable[[list[str]], Awaitable[None]]


async def trivial(question: str) -> str:
    """The trivial program: what we measure is the layer and the store, not the program."""
    return question


@contextlib.contextmanager
def a_server() -> Iterator[str | None]:
    """The URL of a Redis server for the run (None when there is none to be had)."""
    url = os.environ.get("RESILIENT_DSPY_REDIS_URL")
    binary = shutil.which("redis-server")
    if url or binary is None:
        yield url
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    workdir = tempfile.mkdtemp(prefix="bench-redis-")
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no", "--dir", workdir]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


_SENT = {"cmdstat_evalsha", "cmdstat_eval", "cmdstat_ping", "cmdstat_script|load", "cmdstat_script"}
"""The commands a client sends here; the GET, SET, TIME, ... a script runs inside count in commandstats too."""


async def round_trips(client: redis.asyncio.Redis) -> int:
    """Commands clients have sent the server so far (each one round trip), from the server's own counts."""
    stats = await client.info("commandstats")
    return sum(int(value["calls"]) for name, value in stats.items() if name in _SENT)


@dataclass
class Variant:
    name: str
    run: Runner
    unique: bool
    cache: Cache | None = None
    drain: bool = False
    samples: list[float] = field(default_factory=list)
    trips: list[float] = field(default_factory=list)


def sequential(pipeline: Pipeline, cache: Cache | None, drain: bool) -> Runner:
    async def run(questions: list[str]) -> None:
        for question in questions:
            await pipeline(question)
            if drain and cache is not None:
                await cache.drain()

    return run


async def measure(url: str, batch: int, rounds: int) -> dict[str, Any]:
    store = RedisStore(url, prefix=f"bench-{os.getpid()}", timeout=1.0)
    counter = redis.asyncio.Redis.from_url(url)
    variants: list[Variant] = []
    for where in ("memory", "Redis"):
        for kind, unique, drain in (("hit", False, False), ("miss", True, False), ("miss + store drained", True, True)):
            if where == "memory" and drain:
                continue
            cache = Cache() if where == "memory" else Cache(RedisBackend(store, max_entries=None))
            pipeline = Pipeline(trivial, cache)
            variants.append(Variant(f"{where} {kind}", sequential(pipeline, cache, drain), unique, cache, drain))

    async def ping(questions: list[str]) -> None:
        for _ in questions:
            await store.client.ping()

    variants.append(Variant("PING (one round trip)", ping, unique=False))
    same = ["What does a hit cost?"] * batch
    for variant in variants:  # warm up: connections, scripts, the hit's entry
        await variant.run(same)
        if variant.cache is not None:
            await variant.cache.drain()
    for index in range(rounds):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            questions = [f"r{index}-{i} {variant.name}" for i in range(batch)] if variant.unique else same
            before = await round_trips(counter)
            started = time.perf_counter_ns()
            await variant.run(questions)
            elapsed = time.perf_counter_ns() - started
            if variant.cache is not None:
                await variant.cache.drain()  # its background stores are counted with it, not with the next variant
            variant.samples.append(elapsed / batch / 1000)
            variant.trips.append((await round_trips(counter) - before) / batch)
    await store.client.flushdb()
    await counter.aclose()
    await store.aclose()
    return {
        variant.name: {
            "us_median": round(statistics.median(variant.samples), 1),
            "us_min": round(min(variant.samples), 1),
            "round_trips": round(statistics.median(variant.trips), 2),
        }
        for variant in variants
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~5 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    batch, rounds = (10, 2) if args.smoke else (200, 8) if args.quick else (500, 30)
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    with a_server() as url:
        if url is None:
            print("no Redis server: set RESILIENT_DSPY_REDIS_URL or install redis-server; nothing measured")
            return
        print(f"resilient_dspy cache on Redis  {meta['date']}  Python {meta['python']}  {meta['cpus']} CPUs")
        print(f"µs per call, batches of {batch} sequential awaits, {rounds} interleaved rounds; round trips per call")
        started = time.perf_counter()
        table = asyncio.run(measure(url, batch, rounds))
    meta["seconds"] = round(time.perf_counter() - started, 1)
    print(f"  {'variant':<30} {'median':>9} {'min':>9} {'round trips':>12}")
    for name, row in table.items():
        print(f"  {name:<30} {row['us_median']:>9.1f} {row['us_min']:>9.1f} {row['round_trips']:>12.2f}")
    print(f"\nTotal {meta['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "per_call": table}, indent=2))


if __name__ == "__main__":
    main()
