"""What the Cache layer saves and costs: single-flight against DSPy's own cache, and µs per hit and per miss.

Run ``python benchmarks/bench_cache.py [--quick] [--json out.json]``.

Part (a) sends 10 identical concurrent calls (a fresh question each round) through ``Pipeline(predict, Cache())``
and, separately, straight to a ``dspy.Predict`` whose LM has DSPy's own cache on, and counts the LM requests.
The local ``FaultInjectingLM`` answers after 20 ms, so the requests overlap as they would against a provider.

Part (b) times batches of sequential awaits of a trivial ``async def`` (plus one ``dspy.Predict`` target) in one
event loop: variants interleaved round-robin with the order rotated every round; per-call figures are the median
and min over rounds, and overheads are medians of per-round paired differences against the bare await.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="bench-cache-dspy-"))

import dspy

from resilient_dspy import Pipeline
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.testing import FaultInjectingLM

Program = Callable[..., Awaitable[Any]]
Runner = Callable[[list[str]], Awaitable[None]]

CONCURRENT = 10
LATENCY = 0.02


async def trivial(question: str) -> str:
    """The trivial program: what we measure is the layer, not the program."""
    return question


# ------------------------------------------------------------------------------------------ (a) single-flight


async def single_flight_round(variant: str, question: str) -> tuple[int, float]:
    """LM requests made, and seconds taken, by 10 concurrent identical calls of ``question``."""
    latency = {"latency": (LATENCY, LATENCY)}
    if variant == "resilient_dspy Cache":
        lm = FaultInjectingLM(profile=latency)
        pipeline = Pipeline(dspy.Predict("question -> answer"), Cache())
        call: Program = pipeline
    else:
        lm = FaultInjectingLM(profile=latency, cache=True)
        predict = dspy.Predict("question -> answer")

        async def call(question: str) -> Any:
            return await predict.acall(question=question)

    started = time.perf_counter()
    with dspy.context(lm=lm):
        results = await asyncio.gather(*(call(question=question) for _ in range(CONCURRENT)))
    elapsed = time.perf_counter() - started
    assert len({r.answer for r in results}) == 1
    return lm.requests, elapsed


async def single_flight(rounds: int) -> dict[str, Any]:
    variants = ["resilient_dspy Cache", "DSPy cache=True"]
    requests: dict[str, list[int]] = {v: [] for v in variants}
    seconds: dict[str, list[float]] = {v: [] for v in variants}
    for index in range(rounds):
        order = variants if index % 2 == 0 else variants[::-1]
        for variant in order:
            made, took = await single_flight_round(variant, f"Round {index}: what is single-flight? {time.time_ns()}")
            requests[variant].append(made)
            seconds[variant].append(took)
    return {
        variant: {
            "requests_min": min(requests[variant]),
            "requests_median": statistics.median(requests[variant]),
            "requests_max": max(requests[variant]),
            "batch_ms_median": round(statistics.median(seconds[variant]) * 1000, 1),
        }
        for variant in variants
    }


# ------------------------------------------------------------------------------------------ (b) hit and miss cost


def sequential(fn: Program) -> Runner:
    async def run(questions: list[str]) -> None:
        for question in questions:
            await fn(question=question)

    return run


@dataclass
class Variant:
    name: str
    run: Runner
    unique: bool
    context: Any = None
    samples: list[float] = field(default_factory=list)


async def costs(batch: int, rounds: int) -> dict[str, Any]:
    lm = FaultInjectingLM()
    dspy_lm = FaultInjectingLM(cache=True)
    predict_pipeline = Pipeline(dspy.Predict("question -> answer"), Cache())
    dspy_predict = dspy.Predict("question -> answer")

    async def dspy_cached(question: str) -> Any:
        return await dspy_predict.acall(question=question)

    variants = [
        Variant("bare await", sequential(trivial), unique=False),
        Variant("Pipeline(program)", sequential(Pipeline(trivial)), unique=False),
        Variant("Cache hit", sequential(Pipeline(trivial, Cache())), unique=False),
        Variant("Cache miss + store", sequential(Pipeline(trivial, Cache())), unique=True),
        Variant("Cache miss, no single-flight", sequential(Pipeline(trivial, Cache(single_flight=False))), unique=True),
        Variant("Cache hit, dspy.Predict target", sequential(predict_pipeline), unique=False, context=lm),
        Variant("DSPy's own cache hit, Predict", sequential(dspy_cached), unique=False, context=dspy_lm),
    ]
    same = ["What does a hit cost?"] * batch
    for variant in variants:
        with dspy.context(lm=variant.context or lm):
            await variant.run(same)
            await variant.run([f"warm-up {variant.name} {i}" for i in range(batch)] if variant.unique else same)
    for index in range(rounds):
        shift = index % len(variants)
        for variant in variants[shift:] + variants[:shift]:
            questions = [f"r{index}-{i} {variant.name}" for i in range(batch)] if variant.unique else same
            with dspy.context(lm=variant.context or lm):
                started = time.perf_counter_ns()
                await variant.run(questions)
                elapsed = time.perf_counter_ns() - started
            variant.samples.append(elapsed / batch / 1000)
    bare = variants[0].samples
    table = {}
    for variant in variants:
        overheads = [v - b for v, b in zip(variant.samples, bare, strict=True)]
        table[variant.name] = {
            "us_median": round(statistics.median(variant.samples), 2),
            "us_min": round(min(variant.samples), 2),
            "overhead_us_median": round(statistics.median(overheads), 2),
        }
    return table


# ------------------------------------------------------------------------------------------------------ main


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rounds_a = 1 if args.smoke else 6 if args.quick else 20
    batch, rounds_b = (20, 2) if args.smoke else (200, 15) if args.quick else (500, 60)
    print(f"\n(a) {CONCURRENT} identical concurrent misses, LM latency {LATENCY * 1000:.0f} ms, {rounds_a} rounds")
    flight = await single_flight(rounds_a)
    print(f"  {'variant':<24} {'LM requests min/median/max':>28} {'batch ms (median)':>19}")
    for name, row in flight.items():
        counts = f"{row['requests_min']}/{row['requests_median']:g}/{row['requests_max']}"
        print(f"  {name:<24} {counts:>28} {row['batch_ms_median']:>19}")
    print(f"\n(b) µs per call, batches of {batch} sequential awaits, {rounds_b} interleaved rounds")
    table = await costs(batch, rounds_b)
    print(f"  {'variant':<34} {'median':>9} {'min':>9} {'over bare (median)':>19}")
    for name, row in table.items():
        print(f"  {name:<34} {row['us_median']:>9.2f} {row['us_min']:>9.2f} {row['overhead_us_median']:>19.2f}")
    return {"single_flight": flight, "per_call_us": table}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~10 s instead of ~40 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dspy": dspy.__version__,
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"resilient_dspy cache  {meta['date']}  Python {meta['python']}  dspy {meta['dspy']}  {meta['cpus']} CPUs")
    started = time.perf_counter()
    results = asyncio.run(main_async(args))
    meta["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nTotal {meta['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
