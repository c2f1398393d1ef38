"""aiolimiter's AsyncLimiter against resilient_dspy's RateLimiter (exact mode and burst mode), in one run.

Run ``python benchmarks/bench_limiter.py [--quick] [--json out.json]`` (about 20 s; ``--quick`` about 10 s). Every
scenario runs on the real event loop clock (a fresh ``asyncio`` loop each), so what is measured is what a service
would see, scheduling delays included. Four figures per limiter:

- **window**: 500 concurrent acquirers loop for ``--seconds`` against 100 per second; the largest number of
  admissions in any 1-s window (each window starting at an admission), and the count in the first second.
  Admissions are stamped by the caller right after ``acquire`` returns, a few µs after the limiter read its
  clock, and that gap varies by code path; so windows are counted 1 ms short (``GUARD``), or two stamps
  straddling a window edge by microseconds would make an exact limiter look like it admitted 101.
- **utilisation**: admissions in the saturated run / (100 per second x its length).
- **fairness**: 100 one-unit acquirers loop (a flood); 0.5 s in, one 50-unit request arrives. How long until it is
  admitted. aiolimiter orders waiters by amount, so it waits until the flood stops (at ``--cap`` seconds); the
  figure is then reported as "> cap". Next to it, the **FIFO bound**: (1-unit requests already waiting when it
  arrives + 50) / 100 per second, the earliest any first-come first-served limiter that never exceeds the limit
  can admit it, since the window is full when it arrives.

The three limiters run each scenario side by side in one event loop (each with its own limiter and tasks); the
load is a few hundred admissions per second in all, and they share the same scheduling noise.
- **overhead**: the cost per acquisition with no contention (a limit of 10^9 per second), in µs. For aiolimiter:
  ``await limiter.acquire()``. For ours: ``Pipeline(program, RateLimiter(...))`` minus ``Pipeline(program)``,
  paired per round, so it is the middleware's own cost.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from aiolimiter import AsyncLimiter

from resilient_dspy import Pipeline
from resilient_dspy.core.call import Call
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter

Acquire = Callable[[int], Coroutine[Any, Any, None]]

RATE = 100  # per second
ACQUIRERS = 500
FLOOD = 100
LARGE = 50
GUARD = 0.001  # seconds taken off each window: absorbs the µs jitter between the limiter's clock and the stamp


async def record(question: str, tokens: int = 1) -> None:
    """The program under our limiter: does nothing (the admission time is taken by the caller)."""


def by_weight(call: Call) -> int:
    tokens: int = call.inputs.get("tokens", 1)
    return tokens


def aiolimiter_acquire(rate: float = RATE) -> Acquire:
    limiter = AsyncLimiter(rate, 1.0)

    async def acquire(weight: int) -> None:
        await limiter.acquire(weight)

    return acquire


def ours_acquire(limit: Limit, tokens: bool = False) -> Acquire:
    """An acquisition through a pipeline whose only layer is our RateLimiter."""
    pipeline = Pipeline(record, RateLimiter(limit, estimate_tokens=by_weight if tokens else None))

    async def acquire(weight: int) -> None:
        await pipeline(question="q", tokens=weight)

    return acquire


LIMITERS: dict[str, Callable[[bool], Acquire]] = {
    "aiolimiter": lambda tokens: aiolimiter_acquire(),
    "ours (exact)": lambda tokens: ours_acquire(
        Limit.tokens(RATE, 1.0) if tokens else Limit.requests(RATE, 1.0), tokens
    ),
    "ours (burst=100)": lambda tokens: ours_acquire(
        Limit.tokens(RATE, 1.0, burst=RATE) if tokens else Limit.requests(RATE, 1.0, burst=RATE), tokens
    ),
}


def max_in_window(times: list[float], width: float = 1.0 - GUARD) -> int:
    """The most admissions in any window [t, t + width) starting at an admission (two pointers)."""
    times = sorted(times)
    best = end = 0
    for start, t in enumerate(times):
        while end < len(times) and times[end] < t + width:
            end += 1
        best = max(best, end - start)
    return best


async def saturate(acquire: Acquire, seconds: int) -> dict[str, Any]:
    """500 acquirers loop from the first admission for ``seconds`` (whole periods), then are cancelled.

    ``utilisation`` is admissions / (rate x seconds): 100 % is the most an exact limiter may admit, a bucket's
    initial burst pushes it above. ``steady`` leaves the first second out.
    """
    loop = asyncio.get_running_loop()
    admitted: list[float] = []
    started = asyncio.Event()

    async def acquirer() -> None:
        while True:
            await acquire(1)
            admitted.append(loop.time())
            started.set()

    tasks = [asyncio.create_task(acquirer()) for _ in range(ACQUIRERS)]
    await started.wait()
    first = admitted[0]
    await asyncio.sleep(first + seconds - loop.time())
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    inside = [t for t in admitted if t < first + seconds]
    steady = [t for t in inside if t >= first + 1.0]
    return {
        "max_in_any_1s_window": max_in_window(inside),
        "first_second": len(inside) - len(steady),
        "admissions": len(inside),
        "utilisation": len(inside) / (RATE * seconds),
        "steady_utilisation": len(steady) / (RATE * (seconds - 1)),
        "seconds": seconds,
    }


async def fairness(acquire: Acquire, cap: float) -> dict[str, Any]:
    """A flood of 1-unit acquirers; one 50-unit request at +0.5 s. The flood stops when it is admitted, or at
    ``cap`` seconds after it arrived; the wait is measured on the loop clock."""
    loop = asyncio.get_running_loop()
    small = waiting = 0

    async def flooder() -> None:
        nonlocal small, waiting
        while True:
            waiting += 1
            try:
                await acquire(1)
            finally:
                waiting -= 1
            small += 1

    flood = [asyncio.create_task(flooder()) for _ in range(FLOOD)]
    await asyncio.sleep(0.5)
    asked = loop.time()
    ahead = waiting
    large = asyncio.create_task(acquire(LARGE))
    done, _ = await asyncio.wait({large}, timeout=cap)
    starved = not done
    small_during = small
    for task in flood:
        task.cancel()
    await large
    waited = loop.time() - asked
    await asyncio.gather(*flood, return_exceptions=True)
    return {
        "waited_s": waited,
        "starved_until_flood_stopped": starved,
        "cap_s": cap,
        "small_admitted_meanwhile": small_during,
        "waiting_ahead": ahead,
        # first-come first-served and never over the limit: the requests ahead pass first, then the 50 units
        # need 50 free places in a window that is full when it arrives
        "fifo_bound_s": (ahead + LARGE) / RATE,
    }


async def side_by_side(scenarios: list[Coroutine[Any, Any, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One scenario per limiter, all at once in one loop: each has its own limiter and tasks, the load is light
    (100 admissions per second each), and every limiter sees the same scheduling noise."""
    return list(await asyncio.gather(*scenarios))


async def uncontended(rounds: int, batch: int) -> dict[str, float]:
    """µs per acquisition, no contention: aiolimiter's acquire; ours as a pipeline layer minus a bare pipeline."""
    limiter = AsyncLimiter(1e9, 1.0)
    bare = Pipeline(record)
    variants: dict[str, Callable[[], Awaitable[None]]] = {
        "aiolimiter.acquire()": limiter.acquire,
        "Pipeline(program)": lambda: bare(question="q"),
        "+ RateLimiter exact": _through(RateLimiter(Limit.requests(10**9, 1.0))),
        "+ RateLimiter burst": _through(RateLimiter(Limit.requests(10**9, 1.0, burst=10**9))),
        "+ RateLimiter requests+tokens": _through(
            RateLimiter(Limit.requests(10**9, 1.0), Limit.tokens(10**12, 1.0), estimate_tokens=by_weight)
        ),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for name in names:
        await _batch(variants[name], batch)
    gc.collect()
    for round_ in range(rounds):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            samples[name].append(await _batch(variants[name], batch))
    base = samples["Pipeline(program)"]
    result = {
        "aiolimiter.acquire()": statistics.median(samples["aiolimiter.acquire()"]),
        "Pipeline(program)": statistics.median(base),
    }
    for name in names[2:]:
        result[name] = statistics.median(x - y for x, y in zip(samples[name], base, strict=True))
    return result


def _through(layer: RateLimiter) -> Callable[[], Awaitable[None]]:
    pipeline = Pipeline(record, layer)
    return lambda: pipeline(question="q")


async def _batch(fn: Callable[[], Awaitable[None]], n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        await fn()
    return (time.perf_counter_ns() - start) / n / 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter runs (about 10 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--seconds", type=int, help="length of the saturated run, whole seconds (default 5, quick 2)")
    parser.add_argument("--cap", type=float, help="longest fairness wait measured (default 8, quick 5.2)")
    args = parser.parse_args()
    seconds = max(2, args.seconds or (2 if args.quick else 5))
    cap = args.cap or (2.0 if args.smoke else 5.2 if args.quick else 8.0)
    rounds, batch = (3, 50) if args.smoke else (20, 500) if args.quick else (60, 1000)

    results: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "aiolimiter": version("aiolimiter"),
        "rate_per_s": RATE,
        "acquirers": ACQUIRERS,
        "flood": FLOOD,
        "large": LARGE,
        "limiters": {},
    }
    began = time.perf_counter()
    windows = asyncio.run(side_by_side([saturate(make(False), seconds) for make in LIMITERS.values()]))
    fair = asyncio.run(side_by_side([fairness(make(True), cap) for make in LIMITERS.values()]))
    for name, window, figures in zip(LIMITERS, windows, fair, strict=True):
        results["limiters"][name] = {"window": window, "fairness": figures}
    results["uncontended_us"] = asyncio.run(uncontended(rounds, batch))
    results["wall_s"] = time.perf_counter() - began

    print(f"{ACQUIRERS} acquirers at {RATE}/s for {seconds:g} s; fairness: {FLOOD} flooders + one {LARGE}-unit request")
    header = ("limiter", "max in any 1s", "first 1s", "utilisation", "steady", "50-unit wait", "FIFO bound")
    print("{:<18} {:>13} {:>9} {:>12} {:>8} {:>13} {:>11}".format(*header))
    for name, row in results["limiters"].items():
        window, fair = row["window"], row["fairness"]
        wait = f"> {fair['cap_s']:g} s" if fair["starved_until_flood_stopped"] else f"{fair['waited_s']:.2f} s"
        print(
            f"{name:<18} {window['max_in_any_1s_window']:>13} {window['first_second']:>9} "
            f"{window['utilisation']:>11.1%} {window['steady_utilisation']:>8.1%} {wait:>13} "
            f"{fair['fifo_bound_s']:>9.2f} s"
        )
    print("uncontended, µs per acquisition (ours: over a bare Pipeline):")
    for name, value in results["uncontended_us"].items():
        print(f"  {name:<32} {value:7.2f}")
    print(f"wall time {results['wall_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
