"""Instructions per call (valgrind's callgrind): the hot path measured repeatably on a noisy, shared machine.

Wall-clock µs move by 10 to 50 % here when other work runs; an instruction count does not. One child process per tree
(this checkout, and with ``--commit <rev>`` that commit's ``resilient_dspy`` extracted by ``git archive``) runs
under ``valgrind --tool=callgrind --dump-before=os_getppid``: the child calls ``os.getppid()`` between variants,
so each dump holds one variant's cost. Every variant runs ``--calls`` sequential awaits after a warm-up; a figure
is its instructions per call minus those of a bare ``await program(question=...)`` with the same questions (fresh
questions for a miss, one repeated question for a hit). Variants: ``Pipeline(program)``, each layer alone, the
Cache on a miss and a hit, the six-layer stack of ``bench_peers.py`` on a miss and a hit next to two floors
(``floor inline``: all six in one coroutine; ``floor chain``: one minimal coroutine per layer), a Cache hit around
a real ``dspy.Predict`` next to pyresilience's hit around ``acall`` and a dict, and ``--tasks`` concurrent calls
(instructions per task over bare tasks). Run ``python benchmarks/bench_instructions.py [--commit e2af7d8]``
(~2 to 4 min per tree, mostly DSPy's import under valgrind); ``--smoke`` runs the child without valgrind.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CHILD = r"""
import asyncio, gc, json, os, sys
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, sys.argv[3])
import dspy
from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.testing import FaultInjectingLM
from bench_peers import FLOORS, PATTERNS, floor_cache, floor_stack, our_layer, our_stack

calls, tasks = int(sys.argv[1]), int(sys.argv[2])
marker = os.getppid
names = []


async def program(question):
    return question


def floor_chain(fn):
    for pattern in reversed(PATTERNS):
        fn = FLOORS[pattern](fn)
    return fn


async def run(fn, fresh, tag, count):
    if fresh:
        for i in range(count):
            await fn(question=f"{tag}{i}")
    else:
        for i in range(count):
            await fn(question="same")


async def concurrent(make, n, tag):
    gate = asyncio.Event()

    async def gated(question):
        await gate.wait()
        return question

    target = make(gated)
    pending = [asyncio.ensure_future(target(question=f"{tag}{i}")) for i in range(n)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*pending)


async def main():
    lm = FaultInjectingLM()
    predict = dspy.Predict("question -> answer")

    async def acall(question):
        return await predict.acall(question=question)

    variants = {
        "bare miss": (program, True),
        "bare hit": (program, False),
        "pipeline": (Pipeline(program), False),
        **{f"{p} alone": (Pipeline(program, our_layer(p)), False) for p in PATTERNS if p != "cache"},
        "cache miss alone": (Pipeline(program, our_layer("cache")), True),
        "cache hit alone": (Pipeline(program, our_layer("cache")), False),
        "stack miss": (our_stack(program), True),
        "stack hit": (our_stack(program), False),
        "stack miss, no timeout": (Pipeline(program, *(our_layer(p) for p in PATTERNS[1:])), True),
        "stack hit, no timeout": (Pipeline(program, *(our_layer(p) for p in PATTERNS[1:])), False),
        "floor inline miss": (floor_stack(program), True),
        "floor inline hit": (floor_stack(program), False),
        "floor chain miss": (floor_chain(program), True),
        "floor chain hit": (floor_chain(program), False),
        "predict hit ours": (Pipeline(predict, Cache(MemoryBackend(10**6), ttl=None)), False),
        "predict hit dict": (floor_cache(acall), False),
    }
    try:
        import pyresilience

        config = pyresilience.CacheConfig(max_size=10**6, ttl=0.0)
        variants["predict hit pyresilience"] = (pyresilience.resilient(cache=config)(acall), False)
    except ImportError:
        pass
    with dspy.context(lm=lm):
        for name, (fn, fresh) in variants.items():
            await run(fn, fresh, f"warm-{name}", 50)
        gc.collect()
        gc.freeze()  # the start-up heap is not walked again: the counts repeat from run to run
        for name, (fn, fresh) in variants.items():
            names.append((name, fresh))
            marker()
            await run(fn, fresh, name, calls)
    if tasks:
        for name, make in (("tasks bare", lambda fn: fn), ("tasks floor", floor_stack), ("tasks ours", our_stack)):
            await concurrent(make, min(tasks, 1000), "warm")
            names.append((name, True))
            marker()
            await concurrent(make, tasks, name)
    marker()
    print(json.dumps(names))


asyncio.run(main())
"""

TOTAL = re.compile(rb"^(?:summary|totals): (\d+)", re.MULTILINE)


def measure(tree: Path, calls: int, tasks: int, smoke: bool) -> dict[str, float]:
    """Instructions per call (per task for the ``tasks`` rows) of every variant, net of the bare await."""
    path = os.pathsep.join(filter(None, (str(tree), os.environ.get("PYTHONPATH"))))  # the tree first
    env = {**os.environ, "PYTHONPATH": path, "PYTHONHASHSEED": "0", "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    args = [sys.executable, "-c", CHILD, str(calls), str(tasks), str(ROOT / "benchmarks")]
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "cg.out"
        if not smoke:
            args = ["valgrind", "--tool=callgrind", "--dump-before=os_getppid", f"--callgrind-out-file={out}", *args]
        done = subprocess.run(args, cwd=scratch, env=env, capture_output=True, check=True)
        names: list[tuple[str, bool]] = json.loads(done.stdout.decode().strip().splitlines()[-1])
        if smoke:
            return {name: 0.0 for name, _ in names}
        dumps = sorted(Path(scratch).glob("cg.out.*"), key=lambda path: int(path.suffix[1:]))
        costs = [sum(int(n) for n in TOTAL.findall(path.read_bytes())[:1]) for path in dumps]
    region = {name: cost for (name, _), cost in zip(names, costs[1:], strict=False)}  # dump 1: start-up
    figures: dict[str, float] = {}
    for name, fresh in names:
        if name.startswith("tasks"):
            base = region["tasks bare"] if name != "tasks bare" else 0
            figures[f"{name} (per task)"] = (region[name] - base) / tasks
        elif not name.startswith("bare"):
            figures[name] = (region[name] - region["bare miss" if fresh else "bare hit"]) / calls
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--commit", help="an older commit to count next to this checkout")
    parser.add_argument("--calls", type=int, default=500, help="sequential calls per variant")
    parser.add_argument("--tasks", type=int, default=10_000, help="concurrent calls (0: skip)")
    parser.add_argument("--smoke", action="store_true", help="no valgrind, tiny sizes: only checks that it runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    calls, tasks = (5, 20) if args.smoke else (args.calls, args.tasks)
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as scratch:
        trees: dict[str, Path] = {"now": ROOT}
        if args.commit and not args.smoke:
            old = Path(scratch) / "old"
            old.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(ROOT), "archive", args.commit, "resilient_dspy"], capture_output=True, check=True
            )
            subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
            trees = {args.commit: old, "now": ROOT}
        for label, tree in trees.items():
            results[label] = measure(tree, calls, tasks, args.smoke)
    labels = list(results)
    print(f"{'instructions per call, net of bare':<40}" + "".join(f"{label:>12}" for label in labels))
    for figure in dict.fromkeys(f for figures in results.values() for f in figures):
        print(f"{figure:<40}" + "".join(f"{results[label].get(figure, float('nan')):>12,.0f}" for label in labels))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
