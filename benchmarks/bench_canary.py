"""Success-path overhead of a Canary: stable route, candidate route, sticky routing, and a shadow copy per call.

Run ``python benchmarks/bench_canary.py [--quick] [--json out.json]``; see ``benchmarks/README.md``.

Same method as ``bench_overhead.py`` (whose timing code this reuses): one event loop, variants interleaved
round-robin with the order rotating each round, medians of per-round paired differences against a bare
``Pipeline``. Judging is on (windows of 100, p95 latency); nothing is ever rolled back (every call succeeds). The
shadow variant drains its copies after each batch, so their cost is in the figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from bench_overhead import Group, Runner, Variant, fmt_ns, measure, median_pairs, print_group, summarize

from resilient_dspy import Canary, Pipeline, UseProgram


async def program(question: str) -> str:
    """The trivial program: what we measure is the library, not the program."""
    return question


def calls(pipeline: Pipeline, canary: Canary | None = None) -> Runner:
    """``n`` sequential calls; with a shadow canary, its copies are awaited at the end of the batch."""

    async def run(n: int) -> None:
        for i in range(n):
            await pipeline(question=f"q{i}")
        if canary is not None:
            await canary.drain()

    return run


def canary_group(batch: int, rounds: int) -> Group:
    def canary(**options: Any) -> Canary:
        return Canary(UseProgram(program, name="cand"), rng=random.Random(1), **options)

    shadow = canary(mode="shadow", weights=(1.0,), max_shadows=batch + 1)
    variants = [
        Variant("pipeline", calls(Pipeline(program)), "Pipeline(program)"),
        Variant("stable", calls(Pipeline(program, canary(weights=(0.0,)))), "Canary, every call on stable"),
        Variant("split/10%", calls(Pipeline(program, canary(weights=(0.1,)))), "Canary(weights=(0.1,))"),
        Variant("candidate", calls(Pipeline(program, canary(weights=(1.0,)))), "Canary, every call on the candidate"),
        Variant(
            "sticky",
            calls(Pipeline(program, canary(weights=(0.1,), sticky=lambda call: call.inputs["question"]))),
            "sticky=question: a blake2b per call",
        ),
        Variant("shadow", calls(Pipeline(program, shadow), shadow), "mode='shadow', a copy of every call (a task)"),
    ]
    return Group("canary", "Success path of a Canary: trivial program, ns per call", batch, rounds, variants)


async def main_async(quick: bool, smoke: bool = False) -> dict[str, Any]:
    batch, rounds = (50, 2) if smoke else (500, 7) if quick else (2000, 21)
    group = canary_group(batch, rounds)
    await measure(group)
    pipe = group.get("pipeline")
    over = {v.name: median_pairs(v, pipe, lambda x, y: x - y) for v in group.variants[1:]}
    return {"summary": summarize(group), "over_pipeline_ns": over}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small batches and few rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    result = asyncio.run(main_async(args.quick, args.smoke))
    print(f"Python {platform.python_version()} on {platform.machine()}, {platform.system()}")
    print_group(result["summary"])
    print("\nOver a bare Pipeline (paired medians):")
    for name, ns in result["over_pipeline_ns"].items():
        print(f"  {name:<12} {fmt_ns(ns):>10}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
