"""The hot path, timed for this checkout and for an older commit in the same session: the cache's pieces, each
layer alone and the full stack.

Run ``python benchmarks/bench_versions.py [--commit 584872c] [--quick]``: the commit is checked out into a
temporary git worktree, and one child process per tree times the cache key, the envelope ``dumps``/``loads``,
the usage scope, a DSPy setting read, and the Cache layer alone on a miss and a hit (``Pipeline(program, Cache)``
minus ``Pipeline(program)``, paired per round), each layer alone on the success path, and the six-layer stack
(Timeout, Retry, CircuitBreaker, Bulkhead, RateLimiter, Cache) on a miss and a hit, also with a listener
subscribed (every event built). The trees alternate three times and each figure keeps its best run. This is how
``docs/performance.md``'s before/after tables were made.
``--smoke`` times this checkout only, at tiny sizes (the benchmark smoke test uses it). The cache-piece
rows read private attributes (``Cache._keys``, ``Cache._serializer``); a tree without them shows nan there.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = """
import asyncio, json, os, statistics, sys, time, timeit
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import dspy
from resilient_dspy import (
    Bulkhead, Cache, CircuitBreaker, Fallback, Pipeline, RateLimiter, Retry, Static, Timeout,
)
from resilient_dspy.middleware.cache.backends import MemoryBackend

number, rounds, calls = (int(x) for x in sys.argv[1:4])


async def program(question):
    return question


def best_ns(fn):
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e9


async def per_call_us(fn, fresh):
    started = time.perf_counter()
    for i in range(calls):
        await fn(question=f"q{i}-{started}" if fresh else "same")
    return (time.perf_counter() - started) / calls * 1e6


async def main():
    cache = Cache(MemoryBackend(10**7), ttl=None)
    cached, bare = Pipeline(program, cache), Pipeline(program)
    inputs = {"question": "hello"}
    serializer = getattr(cache, "_serializer", None)
    data = serializer.dumps("hello", {}, 0) if serializer is not None else b""

    from resilient_dspy.binding.usage import usage_scope

    try:  # how the library reads a DSPy setting: its own reader where it has one, else dspy.settings
        from resilient_dspy.binding.settings import setting
    except ImportError:
        def setting(name):
            return getattr(dspy.settings, name)

    def scope():
        with usage_scope() as measured:
            pass
        measured.by_model()

    figures = {
        "usage_scope_ns": best_ns(scope),
        "setting_read_ns": best_ns(lambda: setting("lm")),
    }
    try:  # private pieces: a tree that renamed them reports nan for these rows
        figures["key_ns"] = best_ns(lambda: cache._keys.key(inputs))
        figures["dumps_ns"] = best_ns(lambda: cache._serializer.dumps("hello", {}, 0))
        figures["loads_ns"] = best_ns(lambda: cache._serializer.loads(data))
    except AttributeError:
        pass
    samples = {"miss": [], "hit": []}
    for _ in range(rounds):
        for kind, fresh in (("miss", True), ("hit", False)):
            ours, base = await per_call_us(cached, fresh), await per_call_us(bare, fresh)
            samples[kind].append(ours - base)
    figures["cache_miss_us"] = statistics.median(samples["miss"])
    figures["cache_hit_us"] = statistics.median(samples["hit"])

    def stack(*first):
        return Pipeline(
            program, *first, Timeout(10), Retry(3), CircuitBreaker(), Bulkhead(100),
            RateLimiter(requests=10**9, per=1.0), Cache(MemoryBackend(10**7), ttl=None),
        )

    heard = []
    listened = stack()
    listened.subscribe(lambda event: heard.append(1) if len(heard) < 1 else None)
    alone = {
        "timeout": Pipeline(program, Timeout(10)),
        "retry": Pipeline(program, Retry(3)),
        "breaker": Pipeline(program, CircuitBreaker()),
        "bulkhead": Pipeline(program, Bulkhead(100)),
        "ratelimiter": Pipeline(program, RateLimiter(requests=10**9, per=1.0)),
        "fallback": Pipeline(program, Fallback(Static(answer="x"))),
    }
    stacks = {"stack_miss": (stack(), True), "stack_hit": (stack(), False), "stack_hit_listened": (listened, False)}
    paired = {name: [] for name in [*alone, *stacks]}
    for _ in range(rounds):
        for name, pipeline in alone.items():
            paired[name].append(await per_call_us(pipeline, False) - await per_call_us(bare, False))
        for name, (pipeline, fresh) in stacks.items():
            paired[name].append(await per_call_us(pipeline, fresh) - await per_call_us(bare, fresh))
    for name, values in paired.items():
        figures[f"{name}_us"] = statistics.median(values)
    print(json.dumps(figures))


asyncio.run(main())
"""


def measure(tree: Path, sizes: tuple[int, int, int]) -> dict[str, float]:
    """Run the timing child with ``tree`` first on ``sys.path``, so it imports that tree's resilient_dspy."""
    env = {**os.environ, "PYTHONPATH": str(tree), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    completed = subprocess.run(  # cwd=tree: ``-c`` puts the working directory first on sys.path
        [sys.executable, "-c", CHILD, *map(str, sizes)], cwd=tree, env=env, capture_output=True, text=True, check=True
    )
    figures: dict[str, float] = json.loads(completed.stdout.strip().splitlines()[-1])
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", default="584872c", help="the older commit (default: before the cache work)")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--smoke", action="store_true", help="this checkout only, tiny sizes")
    args = parser.parse_args()
    sizes = (200, 2, 50) if args.smoke else (5_000, 10, 1_000) if args.quick else (20_000, 40, 2_000)
    trees: dict[str, Path] = {"now": ROOT}
    with tempfile.TemporaryDirectory() as scratch:
        if not args.smoke:
            old = Path(scratch) / "old"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "-q", "--detach", str(old), args.commit], check=True
            )
            trees = {args.commit: old, "now": ROOT}
        try:
            results: dict[str, dict[str, float]] = {}
            for _ in range(1 if args.smoke or args.quick else 3):  # alternate the trees; keep each figure's best
                for name, tree in trees.items():
                    figures = measure(tree, sizes)
                    best = results.setdefault(name, figures)
                    for figure, value in figures.items():
                        best[figure] = min(best[figure], value)
        finally:
            if not args.smoke:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False)
    names = list(results)
    print(f"{'figure':<22}" + "".join(f"{name:>14}" for name in names))
    for figure in dict.fromkeys(figure for figures in results.values() for figure in figures):
        row = "".join(f"{results[name].get(figure, float('nan')):>14,.2f}" for name in names)
        print(f"{figure:<22}{row}")


if __name__ == "__main__":
    main()
