"""Does a call cost more in an aged process? Hit and miss through the full stack with DSPy's history at 0-10,000.

Run ``python benchmarks/bench_history.py [--quick] [--smoke] [--json out.json]``.

DSPy appends every LM call to ``history`` on the LM and on each calling module, up to
``dspy.settings.max_history_size`` (10,000) entries. A cache key that walked the program with
``named_predictors()`` read all of them on every call, hit or miss. Here one pipeline per history size (0, 100,
1,000, 10,000 entries pre-filled on the ``dspy.Predict`` and on its LM, as DSPy fills them) runs the recommended
stack ``Timeout > RateLimiter > Retry > CircuitBreaker > Bulkhead > Timeout > Cache`` around
``dspy.Predict("question -> answer")`` on a local ``FaultInjectingLM`` (no network, DSPy's cache off).

*hit*: the same question every call. *miss*: a fresh question every call, so the program runs (the history then
grows during a batch; it is cut back to its size between batches, untimed). Every round times one batch of each
variant, in an order rotated each round; the ratio against history 0 is the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="bench-history-dspy-"))

import dspy

from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.testing import FaultInjectingLM

SIZES = (0, 100, 1_000, 10_000)
Runner = Callable[[int], Awaitable[None]]


def entry(i: int) -> dict[str, Any]:
    """One history record shaped like DSPy's (``BaseLM.update_history``)."""
    return {
        "prompt": None,
        "messages": [{"role": "user", "content": f"question {i}"}],
        "kwargs": {"temperature": 0.0},
        "response": None,
        "outputs": [f"answer {i}"],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15},
        "cost": None,
        "timestamp": "2026-12-01T00:00:00",
        "uuid": f"u{i}",
        "model": "fault/local",
        "response_model": "fault/local",
        "model_type": "chat",
    }


class Aged:
    """A full-stack pipeline around a dspy.Predict whose history (and its LM's) holds ``size`` entries."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.lm = FaultInjectingLM()
        self.program = dspy.Predict("question -> answer")
        self.program.lm = self.lm
        history = [entry(i) for i in range(size)]
        self.program.history.extend(history)
        self.lm.history.extend(history)
        self.pipeline = Pipeline(
            self.program,
            Timeout(10),
            RateLimiter(requests=10**9, per=1.0),
            Retry(3),
            CircuitBreaker(5),
            Bulkhead(10_000),
            Timeout(5),
            Cache(MemoryBackend(max_entries=1_000_000), ttl=None),
        )
        self.counter = itertools.count()

    def trim(self) -> None:
        """Cut both histories back to ``size`` entries (misses append to them)."""
        for owner in (self.program, self.lm):
            del owner.history[self.size :]

    def hits(self) -> Runner:
        async def run(n: int) -> None:
            for _ in range(n):
                await self.pipeline(question="the same question")

        return run

    def misses(self) -> Runner:
        async def run(n: int) -> None:
            for _ in range(n):
                await self.pipeline(question=f"q{next(self.counter)}")

        return run


async def time_batch(run: Runner, n: int) -> float:
    """µs per call of one batch."""
    start = time.perf_counter_ns()
    await run(n)
    return (time.perf_counter_ns() - start) / n / 1000


async def sweep(sizes: tuple[int, ...], batches: dict[str, int], rounds: int) -> dict[str, Any]:
    aged = {size: Aged(size) for size in sizes}
    variants = [(kind, size) for kind in batches for size in sizes]
    runners = {(kind, size): getattr(aged[size], kind)() for kind, size in variants}
    samples: dict[tuple[str, int], list[float]] = {v: [] for v in variants}
    for run in runners.values():  # warm up: the first hit stores the answer
        await run(2)
    for number in range(rounds):
        shift = number % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            kind, size = variant
            aged[size].trim()
            samples[variant].append(await time_batch(runners[variant], batches[kind]))
    table: dict[str, Any] = {}
    for kind in batches:
        base = samples[(kind, sizes[0])]
        table[kind] = {
            str(size): {
                "median_us": statistics.median(samples[(kind, size)]),
                "min_us": min(samples[(kind, size)]),
                "ratio_vs_first": statistics.median(t / b for t, b in zip(samples[(kind, size)], base, strict=True)),
            }
            for size in sizes
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller batches and fewer rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    if args.smoke:
        batches, rounds = {"hits": 10, "misses": 3}, 2
    elif args.quick:
        batches, rounds = {"hits": 300, "misses": 30}, 9
    else:
        batches, rounds = {"hits": 2000, "misses": 200}, 21
    started = time.perf_counter()
    table = asyncio.run(sweep(SIZES, batches, rounds))
    elapsed = time.perf_counter() - started
    print(f"Python {platform.python_version()}, dspy {dspy.__version__}, {platform.machine()} {platform.system()}")
    print(f"batches {batches}, {rounds} paired rounds, {elapsed:.1f} s")
    print(f"\n  {'history':>8}  {'hit µs':>9} {'(min)':>9} {'vs 0':>6}  {'miss µs':>9} {'(min)':>9} {'vs 0':>6}")
    for size in SIZES:
        hit, miss = table["hits"][str(size)], table["misses"][str(size)]
        print(
            f"  {size:>8,}  {hit['median_us']:>9,.1f} {hit['min_us']:>9,.1f} {hit['ratio_vs_first']:>5.2f}x"
            f"  {miss['median_us']:>9,.1f} {miss['min_us']:>9,.1f} {miss['ratio_vs_first']:>5.2f}x"
        )
    if args.json:
        args.json.write_text(json.dumps({"batches": batches, "rounds": rounds, "table": table}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
