"""Success-path overhead of each stateful guard (breaker, bulkhead, rate limiter, cache) and the full stack.

Run ``python benchmarks/bench_guards.py [--quick] [--json out.json]``; see ``benchmarks/README.md``.

Same method as ``bench_overhead.py`` (whose timing code this reuses): one event loop, variants interleaved
round-robin with the order rotating each round, medians of per-round paired differences against the
baseline. Every call uses a fresh question (``q0``, ``q1``, …), so a cache *miss* is a real miss; the
``bare`` baseline formats the same strings. Limits are set high enough never to bind: this is the cost of
admission, not of waiting.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_overhead import Group, Runner, Variant, fmt_ns, measure, median_pairs, print_group, summarize

from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout, by_model
from resilient_dspy.middleware.cache.backends import MemoryBackend


async def program(question: str) -> str:
    """The trivial program: what we measure is the library, not the program."""
    return question


def fresh(fn: Any) -> Runner:
    """``n`` sequential calls of ``fn`` with a new question each (a counter shared across batches)."""
    counter = [0]

    async def run(n: int) -> None:
        start = counter[0]
        for i in range(start, start + n):
            await fn(question=f"q{i}")
        counter[0] = start + n

    return run


def same(fn: Any) -> Runner:
    """``n`` calls with a question that changes per call only in the formatted integer, all cache hits."""

    async def run(n: int) -> None:
        for i in range(n):
            await fn(question=f"q{i % 1}")

    return run


def stack(*, cache: bool) -> Pipeline:
    layers: list[Any] = [
        Timeout(10),
        RateLimiter(requests=10**9, per=1.0),
        Retry(3),
        CircuitBreaker(5),
        Bulkhead(10_000),
        Timeout(5),
    ]
    if cache:
        layers.append(Cache(MemoryBackend(max_entries=1_000_000), ttl=None))
    return Pipeline(program, *layers)


def guard_group(batch: int, rounds: int) -> Group:
    hits = Pipeline(program, Cache(MemoryBackend(), ttl=None))
    full_hits = stack(cache=True)
    variants = [
        Variant("bare", fresh(program), "await program(question=f'q{i}')"),
        Variant("pipeline", fresh(Pipeline(program)), "Pipeline(program)"),
        Variant("breaker", fresh(Pipeline(program, CircuitBreaker(5))), "CircuitBreaker(5), consecutive"),
        Variant(
            "breaker/rate",
            fresh(Pipeline(program, CircuitBreaker(failure_rate=0.5, window_seconds=60, min_calls=10))),
            "CircuitBreaker(failure_rate=0.5, window_seconds=60)",
        ),
        Variant("breaker/keyed", fresh(Pipeline(program, CircuitBreaker(5, key=by_model))), "key=by_model"),
        Variant("bulkhead", fresh(Pipeline(program, Bulkhead(10_000))), "Bulkhead(10_000), never full"),
        Variant(
            "limiter",
            fresh(Pipeline(program, RateLimiter(requests=10**9, per=1.0))),
            "RateLimiter(requests=1e9, per=1s), exact sliding log",
        ),
        Variant(
            "cache/miss",
            fresh(Pipeline(program, Cache(MemoryBackend(max_entries=1_000_000), ttl=None))),
            "Cache(memory): key, flight, store",
        ),
        Variant("cache/hit", same(hits), "Cache(memory): key, get, decode"),
        Variant("stack/miss", fresh(stack(cache=True)), "Timeout>Limiter>Retry>Breaker>Bulkhead>Timeout>Cache miss"),
        Variant("stack/hit", same(full_hits), "the same stack, cache hit"),
        Variant("stack/no-cache", fresh(stack(cache=False)), "the same stack without Cache"),
    ]
    return Group("guards", "Success path of each guard: trivial program, ns per call", batch, rounds, variants)


def per_layer(group: Group) -> dict[str, float]:
    pipe = group.get("pipeline")
    return {v.name: median_pairs(v, pipe, lambda x, y: x - y) for v in group.variants[2:]}


async def main_async(quick: bool, smoke: bool = False) -> dict[str, Any]:
    batch, rounds = (50, 2) if smoke else (500, 7) if quick else (2000, 21)
    group = guard_group(batch, rounds)
    await measure(group)
    summary = summarize(group)
    return {"summary": summary, "over_pipeline_ns": per_layer(group)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few rounds (a smoke run)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    result = asyncio.run(main_async(args.quick, args.smoke))
    print(f"Python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print_group(result["summary"])
    print("\nEach layer over a bare Pipeline (paired medians):")
    for name, ns in result["over_pipeline_ns"].items():
        print(f"  {name:<16} {fmt_ns(ns):>10}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
