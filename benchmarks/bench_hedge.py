"""Hedge against a heavy tail: p99 latency of 1,000 calls with and without ``Hedge``, and the extra calls it cost.

Run ``python benchmarks/bench_hedge.py [--calls 1000] [--seed 0] [--real] [--smoke] [--json out.json]`` (about 10 s;
``--real`` adds the real-clock run, about 7 s more).

The provider: every request (a hedge is a request of its own) takes ``base`` seconds, drawn uniformly from
[0.9, 1.1], and 5 % of requests take 10 times that (seeded ``random.Random``). Calls arrive 50 at a time
(``--concurrency``). Each configuration sees the same seed, so the same latency stream.

Two clocks, side by side:

- **virtual** (looptime): the latencies are ``asyncio.sleep`` on the loop's clock, which looptime fast-forwards when
  every task waits; a call's duration is exactly the latencies it waited for and the hedge delays, so the figures
  are the model's, free of scheduling noise. What the layer itself costs in CPU is not in them: the last line
  measures it on the real clock (a program that answers at once, with and without a Hedge that never fires);
- **real** (``--real``): the same model scaled to milliseconds (base 45-55 ms, tail x10) on the real clock: a check
  with real scheduling, noise included (on a loaded machine the noise inflates every latency, and a fixed delay
  hedges far more often than the model says; a learned one follows the inflation).

"extra calls" = requests the hedges made / calls. A single hedge that starts ``d`` after the first attempt answers
at best ``d + base``; against a tail of 10 x base this caps the p99 cut near 10 x base / (d + base) < 5 for any
``d`` above the base latency (below it, most calls are hedged): the report states the ceiling next to the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
from typing import Any

import looptime

from resilient_dspy import Hedge, Pipeline
from resilient_dspy.middleware.hedge import Percentile

TAIL_SHARE = 0.05
TAIL_FACTOR = 10.0
REAL_SCALE = 0.05
"""The real-clock run: base latency 45-55 ms."""


class HeavyTail:
    """The provider: each request sleeps base (U(0.9, 1.1) x scale) seconds, x10 for 5 % of requests."""

    def __init__(self, seed: int, scale: float) -> None:
        self.rng = random.Random(seed)
        self.scale = scale
        self.requests = 0

    async def __call__(self, question: str) -> str:
        self.requests += 1
        latency = self.rng.uniform(0.9, 1.1) * self.scale
        if self.rng.random() < TAIL_SHARE:
            latency *= TAIL_FACTOR
        await asyncio.sleep(latency)
        return question


def configurations(scale: float) -> dict[str, Hedge | None]:
    return {
        "no hedge": None,
        f"Hedge({1.15 * scale:g})": Hedge(1.15 * scale),
        "Hedge('p97')": Hedge(Percentile(0.97, ceiling=2.0 * scale)),
        "Hedge(p90, max_hedges=2)": Hedge(Percentile(0.9, ceiling=2.0 * scale), max_hedges=2),
    }


async def run_one(hedge: Hedge | None, calls: int, concurrency: int, seed: int, scale: float) -> dict[str, Any]:
    provider = HeavyTail(seed, scale)
    pipeline = Pipeline(provider) if hedge is None else Pipeline(provider, hedge)
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    durations: list[float] = []

    async def one(index: int) -> None:
        async with gate:
            started = loop.time()
            await pipeline(f"q{index}")
            durations.append(loop.time() - started)

    await asyncio.gather(*(one(i) for i in range(calls)))
    durations.sort()
    quantiles = statistics.quantiles(durations, n=100, method="inclusive")
    return {
        "p50": quantiles[49] / scale,
        "p99": quantiles[98] / scale,
        "max": durations[-1] / scale,
        "extra_calls": (provider.requests - calls) / calls,
        "learned_delay": None
        if hedge is None or isinstance(hedge.options.delay, float)
        else hedge.current_delay() / scale,
    }


def measure(clock: str, calls: int, concurrency: int, seed: int) -> dict[str, dict[str, Any]]:
    scale = 1.0 if clock == "virtual" else REAL_SCALE
    results: dict[str, dict[str, Any]] = {}
    for label, hedge in configurations(scale).items():
        loop = looptime.new_event_loop() if clock == "virtual" else asyncio.new_event_loop()
        try:
            results[label] = loop.run_until_complete(run_one(hedge, calls, concurrency, seed, scale))
        finally:
            loop.close()
    baseline = results["no hedge"]["p99"]
    for result in results.values():
        result["p99_cut"] = baseline / result["p99"]
    return results


async def echo(question: str) -> str:
    return question


def overhead(calls: int) -> dict[str, float]:
    """µs per call on the real clock of a program that answers at once: bare, and under a Hedge that never fires
    (each call still runs its attempt in a task, with a timer and a usage scope); best of 5 rounds."""

    async def per_call(pipeline: Pipeline) -> float:
        for _ in range(calls // 10):
            await pipeline("q")
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(calls):
                await pipeline("q")
            best = min(best, (time.perf_counter() - started) / calls * 1e6)
        return best

    async def both() -> dict[str, float]:
        bare, hedged = await per_call(Pipeline(echo)), await per_call(Pipeline(echo, Hedge(1.0)))
        return {"bare_us": bare, "hedged_us": hedged, "overhead_us": hedged - bare}

    return asyncio.run(both())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--real", action="store_true", help="also run the model on the real clock (in ms)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, for tests/test_benchmarks.py")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    calls = 60 if args.smoke else args.calls
    report: dict[str, Any] = {
        "calls": calls,
        "seed": args.seed,
        "tail": f"{TAIL_SHARE:.0%} of requests x{TAIL_FACTOR:g}",
    }
    for clock in ("virtual", "real") if args.real or args.smoke else ("virtual",):
        results = measure(clock, calls, args.concurrency, args.seed)
        report[clock] = results
        unit = "s" if clock == "virtual" else f"x {REAL_SCALE * 1000:g} ms"
        print(f"\n{clock} clock: {calls} calls, {report['tail']}, base U(0.9, 1.1) ({unit})")
        print(f"{'configuration':<26} {'p50':>6} {'p99':>6} {'max':>6} {'p99 cut':>8} {'extra calls':>12} {'delay':>6}")
        for label, r in results.items():
            delay = "-" if r["learned_delay"] is None else f"{r['learned_delay']:.2f}"
            print(
                f"{label:<26} {r['p50']:6.2f} {r['p99']:6.2f} {r['max']:6.2f} {r['p99_cut']:7.2f}x "
                f"{r['extra_calls']:11.1%} {delay:>6}"
            )
    b80 = 0.9 + 0.8 * 0.2  # the 80th percentile of U(0.9, 1.1): the p99 of a hedged run is its hedges' d + b80
    bounds = ", ".join(f"{TAIL_FACTOR * b80 / (d + b80):.2f}x at delay {d:g}" for d in (1.15, 1.10, 1.0))
    print(f"\nbound on the p99 cut of one hedge started after delay d, 10 x b80 / (d + b80): {bounds}")
    cost = report["overhead"] = overhead(200 if args.smoke else 20_000)
    print(
        f"overhead per call (real clock, a program that answers at once): {cost['bare_us']:.1f} µs bare, "
        f"{cost['hedged_us']:.1f} µs under a Hedge that never fires (+{cost['overhead_us']:.1f} µs)"
    )
    if args.json:
        with open(args.json, "w") as out:
            json.dump(report, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
