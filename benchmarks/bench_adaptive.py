"""Goodput of AdaptiveConcurrency against fixed Bulkheads past a concurrency knee, and what AdaptiveThrottle spares a
provider that sheds load. Everything runs on looptime's virtual time, so the figures are exact and repeatable.

Run ``python benchmarks/bench_adaptive.py [--quick | --smoke] [--json out.json] [--write-docs docs/benchmarks.md]``
(about 1 min; ``--quick`` about 30 s; ``--smoke`` a few seconds, for the test suite).

- **knee**: a provider (:class:`resilient_dspy.testing.overload.KneeProvider`) answers in 1 s while at most 8 calls
  are in flight and in ``(n/8)**2`` s beyond, so its best throughput is 8 answers/s at 8 in flight and it falls as
  ``64/n`` past that. 12 calls/s are offered (open loop) for ``--seconds``, each under a total ``Timeout(10)``;
  the layer under test queues for at most 2 s (``max_wait``). Goodput is answers per second; "of best" is goodput /
  8. Variants: ``AdaptiveConcurrency("aimd", latency_threshold=1.5)``, ``AdaptiveConcurrency("gradient")`` (both
  starting at their default limit 10), and ``Bulkhead`` at 64 (too high), 2 (too low) and 8 (the knee, known only
  to an oracle).
- **throttle**: a provider (:class:`resilient_dspy.testing.overload.SheddingProvider`) serves 10 calls/s and sheds
  the rest with a 503; 50 calls/s are offered for ``--seconds``, bare and under ``AdaptiveThrottle()`` (k=2, a
  120 s window). "reached" counts the calls that reached the provider, "shed" those it refused.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import looptime

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section

from resilient_dspy import AdaptiveConcurrency, AdaptiveThrottle, Bulkhead, Pipeline, Timeout
from resilient_dspy.testing.overload import KneeProvider, SheddingProvider, offer

KNEE, BASE, BEST = 8, 1.0, 8.0
SIZES = {"smoke": (20, 20), "quick": (300, 120), "full": (600, 600)}  # (knee seconds, throttle seconds)
START, END = (
    "<!-- bench_adaptive.py: this section is written by `python benchmarks/bench_adaptive.py --write-docs` -->",
    ("<!-- /bench_adaptive.py -->"),
)


def virtual(coroutine: Any) -> Any:
    loop = looptime.new_event_loop()
    try:
        return loop.run_until_complete(coroutine)
    finally:
        loop.close()


def knee_variants() -> dict[str, Any]:
    return {
        'AdaptiveConcurrency("aimd", latency_threshold=1.5)': lambda: AdaptiveConcurrency(
            "aimd", latency_threshold=1.5, max_wait=2.0
        ),
        'AdaptiveConcurrency("gradient")': lambda: AdaptiveConcurrency("gradient", max_wait=2.0),
        "Bulkhead(64) (too high)": lambda: Bulkhead(64, max_wait=2.0),
        "Bulkhead(2) (too low)": lambda: Bulkhead(2, max_wait=2.0),
        "Bulkhead(8) (the knee, by oracle)": lambda: Bulkhead(8, max_wait=2.0),
    }


async def knee_run(layer: Any, seconds: int) -> dict[str, Any]:
    provider = KneeProvider(knee=KNEE, base=BASE, power=2.0)
    offered = await offer(Pipeline(provider, Timeout(10.0), layer), rate=12, duration=seconds)
    snapshot = layer.snapshot()
    return {
        "goodput_per_s": offered.goodput(seconds),
        "of_best": offered.goodput(seconds) / BEST,
        "offered": offered.sent,
        "refused": offered.errors["BulkheadFullError"],
        "timed_out": offered.errors["TimeoutExceededError"],
        "peak_in_flight": provider.max_in_flight,
        "final_limit": getattr(snapshot, "limit", getattr(snapshot, "max_concurrent", None)),
    }


async def throttle_run(throttled: bool, seconds: int) -> dict[str, Any]:
    provider = SheddingProvider(capacity=10, latency=0.1)
    layers = [AdaptiveThrottle(rng=random.Random(0))] if throttled else []
    offered = await offer(Pipeline(provider, *layers), rate=50, duration=seconds)
    return {
        "offered": offered.sent,
        "reached": provider.reached,
        "shed": provider.shed,
        "answered": offered.ok,
        "refused_locally": offered.errors["ThrottledError"],
    }


def report(results: dict[str, Any], command: str, elapsed: float) -> list[str]:
    knee_s, throttle_s = results["seconds"]
    lines = [
        START,
        "",
        "## Adaptive concurrency and throttling under overload (`bench_adaptive.py`)",
        "",
        f"Run {results['when']} · `{command}` · {elapsed:.1f} s · {results['machine']} · looptime virtual time",
        "",
        f"A provider that answers in 1 s up to 8 calls in flight and in (n/8)² s beyond (best: 8 answers/s), offered "
        f"12 calls/s for {knee_s} s under `Timeout(10)`, each layer queueing at most 2 s:",
        "",
        "| layer | goodput /s | of best | refused | timed out | peak in flight | final limit |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, row in results["knee"].items():
        lines.append(
            f"| `{name}` | {row['goodput_per_s']:.2f} | {row['of_best']:.0%} | {row['refused']} | "
            f"{row['timed_out']} | {row['peak_in_flight']} | {row['final_limit']} |"
        )
    bare, throttled = results["throttle"]["bare"], results["throttle"]["throttled"]
    lines += [
        "",
        f"A provider that serves 10 calls/s and sheds the rest with a 503, offered 50 calls/s for {throttle_s} s:",
        "",
        "| client | offered | reached the provider | shed by it | answered | refused locally |",
        "|---|---:|---:|---:|---:|---:|",
        f"| bare | {bare['offered']} | {bare['reached']} | {bare['shed']} | {bare['answered']} | 0 |",
        f"| `AdaptiveThrottle()` | {throttled['offered']} | {throttled['reached']} | {throttled['shed']} | "
        f"{throttled['answered']} | {throttled['refused_locally']} |",
        "",
        f"The throttle cut the load on the shedding provider to {throttled['reached'] / bare['reached']:.0%} of the "
        f"bare client's ({throttled['reached'] / max(1, throttled['answered']):.2f} calls per answer, k=2 allows "
        f"about 2) for {throttled['answered'] / max(1, bare['answered']):.0%} of its answers.",
        "",
        END,
    ]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="shorter runs")
    size.add_argument("--smoke", action="store_true", help="tiny runs, for the test suite")
    parser.add_argument("--json", type=Path, help="write the results as JSON")
    parser.add_argument("--write-docs", type=Path, help="write the markdown section into this file")
    args = parser.parse_args()
    knee_s, throttle_s = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    started = time.perf_counter()
    results: dict[str, Any] = {
        "when": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": f"{platform.machine()}, Python {platform.python_version()}",
        "seconds": (knee_s, throttle_s),
        "knee": {name: virtual(knee_run(make(), knee_s)) for name, make in knee_variants().items()},
        "throttle": {
            "bare": virtual(throttle_run(False, throttle_s)),
            "throttled": virtual(throttle_run(True, throttle_s)),
        },
    }
    flags = " --smoke" if args.smoke else " --quick" if args.quick else ""
    command = f"python benchmarks/bench_adaptive.py{flags}" + (
        " --write-docs docs/benchmarks.md" if args.write_docs else ""
    )
    lines = report(results, command, time.perf_counter() - started)
    print("\n".join(lines[2:-2]))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.write_docs:
        write_section(args.write_docs, START, END, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
