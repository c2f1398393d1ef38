"""Per-call overhead of resilient_dspy's Timeout + Retry + Fallback over a bare ``await``.

Run ``python benchmarks/bench_overhead.py [--quick] [--json out.json]``; see ``benchmarks/README.md``.

All variants run in one event loop. Each sample is one batch of awaits timed with ``perf_counter_ns``;
variants of a group are interleaved round-robin (the order rotates every round), and every figure is a
median over rounds. Overheads and ratios are medians of per-round paired differences / ratios against the
group's baseline, so slow drift on a shared machine cancels out.
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
import tracemalloc
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from resilient_dspy import Fallback, Pipeline, Retry, Static, Timeout
from resilient_dspy.testing import FaultInjectingLM

Runner = Callable[[int], Awaitable[None]]
Program = Callable[..., Awaitable[Any]]

GROUPS = ("success", "failure", "dspy", "alloc")


async def program(question: str) -> str:
    """The trivial program: whatever we measure is the library, not the program."""
    return question


class Flaky:
    """An ``async def``-like program that fails ``pending`` more times, then answers."""

    def __init__(self, error: Callable[[], Exception]) -> None:
        self.error = error
        self.pending = 0

    async def __call__(self, question: str) -> str:
        if self.pending:
            self.pending -= 1
            raise self.error()
        return question


def calls(fn: Program) -> Runner:
    """``n`` sequential ``await fn(question="q")`` (the same loop code for every variant)."""

    async def run(n: int) -> None:
        for _ in range(n):
            await fn(question="q")

    return run


def failing_calls(fn: Program, flaky: Flaky, failures: int) -> Runner:
    """``n`` calls of ``fn`` whose program fails its first ``failures`` attempts of each call."""

    async def run(n: int) -> None:
        for _ in range(n):
            flaky.pending = failures
            await fn(question="q")

    return run


def raising_calls(flaky: Flaky) -> Runner:
    """``n`` bare awaits of ``flaky`` that raise once each, caught by the caller (the program's own cost)."""

    async def run(n: int) -> None:
        for _ in range(n):
            flaky.pending = 1
            try:  # noqa: SIM105 - contextlib.suppress would add its own cost to the baseline
                await flaky(question="q")
            except Exception:
                pass

    return run


def sleeping_calls(flaky: Flaky) -> Runner:
    """``n`` bare awaits of ``flaky`` each followed by ``asyncio.sleep(0)`` (one turn of the event loop)."""

    async def run(n: int) -> None:
        for _ in range(n):
            flaky.pending = 0
            await flaky(question="q")
            await asyncio.sleep(0)

    return run


@dataclass
class Variant:
    """One thing to time; ``samples`` holds ns per call, one per round."""

    name: str
    run: Runner
    note: str = ""
    samples: list[float] = field(default_factory=list)


@dataclass
class Group:
    """Variants timed against each other; the first is the baseline."""

    name: str
    title: str
    batch: int
    rounds: int
    variants: list[Variant]

    def get(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)


async def time_batch(run: Runner, n: int) -> float:
    """ns per call of one batch; ends with one loop turn so cancelled timers are cleaned up (and paid for)."""
    start = time.perf_counter_ns()
    await run(n)
    await asyncio.sleep(0)
    return (time.perf_counter_ns() - start) / n


async def measure(group: Group, warmup: int = 2) -> None:
    """Warm every variant up, then time ``rounds`` rounds, rotating the order each round."""
    for variant in group.variants:
        for _ in range(warmup):
            await time_batch(variant.run, group.batch)
    gc.collect()
    count = len(group.variants)
    for round_ in range(group.rounds):
        for i in range(count):
            variant = group.variants[(round_ + i) % count]
            variant.samples.append(await time_batch(variant.run, group.batch))


def median_pairs(a: Variant, b: Variant, op: Callable[[float, float], float]) -> float:
    return statistics.median(op(x, y) for x, y in zip(a.samples, b.samples, strict=True))


def median_ci(values: list[float]) -> tuple[float, float]:
    """A distribution-free ~95% confidence interval of the median (order statistics)."""
    ordered = sorted(values)
    n = len(ordered)
    k = max(0, int((n - 1.96 * n**0.5) / 2))
    return ordered[k], ordered[n - 1 - k]


def quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def summarize(group: Group) -> dict[str, Any]:
    """Per-variant medians, and overhead / ratio against the baseline (paired per round)."""
    base = group.variants[0]
    rows = {}
    for v in group.variants:
        diffs = [x - y for x, y in zip(v.samples, base.samples, strict=True)]
        rows[v.name] = {
            "note": v.note,
            "median_ns": statistics.median(v.samples),
            "min_ns": min(v.samples),
            "iqr_ns": quartiles(v.samples),
            "overhead_ns": statistics.median(diffs),
            "overhead_ci95_ns": median_ci(diffs),
            "overhead_iqr_ns": quartiles(diffs),
            "ratio": median_pairs(v, base, lambda x, y: x / y),
            "samples_ns": [round(s, 1) for s in v.samples],
        }
    return {
        "title": group.title,
        "baseline": base.name,
        "batch": group.batch,
        "rounds": group.rounds,
        "variants": rows,
    }


# --- the groups -----------------------------------------------------------------------------------------


def layer_variants(target: Any) -> list[Variant]:
    """``target`` in a bare Pipeline, under each layer alone, and under the production stack."""
    stack = Pipeline(target, Fallback(Static(answer="x")), Timeout(10), Retry(3))
    return [
        Variant("pipeline", calls(Pipeline(target)), "Pipeline(program), no middleware"),
        Variant("timeout", calls(Pipeline(target, Timeout(10))), "Pipeline(program, Timeout(10))"),
        Variant("retry", calls(Pipeline(target, Retry(3))), "Pipeline(program, Retry(3)) (default budget)"),
        Variant(
            "fallback",
            calls(Pipeline(target, Fallback(Static(answer="x")))),
            "Pipeline(program, Fallback(Static(answer='x')))",
        ),
        Variant("stack", calls(stack), "Fallback(Static) > Timeout(10) > Retry(3)"),
    ]


def success_group(batch: int, rounds: int) -> Group:
    return Group(
        "success",
        "Success path: trivial program, ns per call",
        batch,
        rounds,
        [Variant("bare", calls(program), "await program(question='q')"), *layer_variants(program)],
    )


FAILURES = (1, 2, 3)


def failure_group(batch: int, rounds: int) -> Group:
    def retry() -> Retry:
        return Retry(max(FAILURES) + 1, base_delay=0, jitter="none", budget=None)

    conn = Flaky(lambda: ConnectionError("injected"))
    server = Flaky(lambda: dspy.LMServerError("injected", status=503))
    conn_retry = Pipeline(conn, retry())
    server_retry = Pipeline(server, retry())
    conn_stack = Pipeline(conn, Fallback(Static(answer="x")), Timeout(10), retry())
    variants = [
        Variant("bare", failing_calls(conn, conn, 0), "await program() that succeeds"),
        Variant("bare+raise", raising_calls(conn), "await program() that raises once, caught by the caller"),
        Variant("bare+sleep0", sleeping_calls(conn), "await program(); await asyncio.sleep(0)"),
    ]
    for label, pipe, flaky, ks in (
        ("retry/conn", conn_retry, conn, (0, *FAILURES)),
        ("retry/server", server_retry, server, (0, max(FAILURES))),
        ("stack/conn", conn_stack, conn, (0, max(FAILURES))),
    ):
        for k in ks:
            variants.append(Variant(f"{label} k={k}", failing_calls(pipe, flaky, k), f"{k} failed attempt(s)"))
    return Group("failure", "Failure path: program fails its first k attempts, ns per call", batch, rounds, variants)


def dspy_group(batch: int, rounds: int) -> Group:
    lm = FaultInjectingLM()
    dspy.configure(lm=lm)
    predict = dspy.Predict("question -> answer")

    async def bare(question: str) -> Any:
        return await predict.acall(question=question)

    return Group(
        "dspy",
        "dspy.Predict on FaultInjectingLM, ns per call",
        batch,
        rounds,
        [
            Variant("bare", calls(bare), "await predict.acall(question='q')"),
            *layer_variants(predict),
        ],
    )


async def allocations(fn: Program, calls_: int) -> dict[str, float]:
    """Median peak traced bytes above the baseline during one call, and bytes retained per call."""
    for _ in range(200):
        await fn(question="q")
    gc.collect()
    tracemalloc.start()
    try:
        peaks = []
        for _ in range(calls_):
            current = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            await fn(question="q")
            peaks.append(tracemalloc.get_traced_memory()[1] - current)
        await asyncio.sleep(0)
        gc.collect()
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(calls_):
            await fn(question="q")
        await asyncio.sleep(0)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    return {"peak_bytes_per_call": statistics.median(peaks), "retained_bytes_per_call": (after - before) / calls_}


async def alloc_pass(calls_: int) -> dict[str, dict[str, float]]:
    """The un-timed tracemalloc pass over the success-path variants."""
    targets: dict[str, Program] = {
        "bare": program,
        "pipeline": Pipeline(program),
        "timeout": Pipeline(program, Timeout(10)),
        "retry": Pipeline(program, Retry(3)),
        "fallback": Pipeline(program, Fallback(Static(answer="x"))),
        "stack": Pipeline(program, Fallback(Static(answer="x")), Timeout(10), Retry(3)),
    }
    return {name: await allocations(fn, calls_) for name, fn in targets.items()}


# --- derived figures and printing ---------------------------------------------------------------------


def attribute(group: Group, summary: dict[str, Any]) -> dict[str, Any]:
    """Each layer alone over a bare Pipeline, their sum, and the stack over Pipeline and over bare."""
    pipe = group.get("pipeline")
    layers = {
        name: median_pairs(group.get(name), pipe, lambda x, y: x - y) for name in ("timeout", "retry", "fallback")
    }
    return {
        "pipeline_over_bare_ns": summary["variants"]["pipeline"]["overhead_ns"],
        "layer_over_pipeline_ns": layers,
        "sum_of_layers_ns": sum(layers.values()),
        "stack_over_pipeline_ns": median_pairs(group.get("stack"), pipe, lambda x, y: x - y),
        "stack_over_bare_ns": summary["variants"]["stack"]["overhead_ns"],
    }


def derive(groups: dict[str, Group], summaries: dict[str, Any]) -> dict[str, Any]:
    """Layer attribution, per-failed-attempt cost, and the overhead in proportion to a DSPy call."""
    derived: dict[str, Any] = {}
    for name in ("success", "dspy"):
        if name in groups:
            derived[name] = attribute(groups[name], summaries[name])
    if "failure" in groups:
        g = groups["failure"]
        bare = g.get("bare")
        per_attempt: dict[str, float] = {}
        for label in ("retry/conn", "retry/server", "stack/conn"):
            zero = g.get(f"{label} k=0")
            for k in FAILURES:
                name = f"{label} k={k}"
                if any(v.name == name for v in g.variants):
                    diffs = [(x - y) / k for x, y in zip(g.get(name).samples, zero.samples, strict=True)]
                    per_attempt[name] = statistics.median(diffs)
        raise_ns = median_pairs(g.get("bare+raise"), bare, lambda x, y: x - y)
        sleep_ns = median_pairs(g.get("bare+sleep0"), bare, lambda x, y: x - y)
        key = f"retry/conn k={max(FAILURES)}"
        derived["failure"] = {
            "per_failed_attempt_ns": per_attempt,
            "program_raise_ns": raise_ns,
            "sleep0_loop_turn_ns": sleep_ns,
            "retry_bookkeeping_ns": per_attempt[key] - raise_ns - sleep_ns,
            "bookkeeping_from": key,
        }
    if "dspy" in groups:
        predict_ns = summaries["dspy"]["variants"]["bare"]["median_ns"]
        derived["dspy"]["predict_bare_ns"] = predict_ns
        derived["dspy"]["stack_overhead_pct_of_predict"] = 100 * derived["dspy"]["stack_over_bare_ns"] / predict_ns
        if "success" in derived:
            loop_overhead = derived["success"]["stack_over_bare_ns"]
            derived["dspy"]["trivial_loop_stack_overhead_pct_of_predict"] = 100 * loop_overhead / predict_ns
    return derived


def fmt_ns(ns: float) -> str:
    return f"{ns / 1000:,.1f} µs" if abs(ns) >= 100_000 else f"{ns:,.0f} ns"


def print_group(summary: dict[str, Any]) -> None:
    print(f"\n{summary['title']}  (batch {summary['batch']}, {summary['rounds']} rounds, ", end="")
    print(f"baseline '{summary['baseline']}')")
    header = f"  {'variant':<20} {'median':>11} {'min':>11} {'overhead':>11} {'overhead 95% CI':>23} {'ratio':>7}"
    print(header)
    print("  " + "-" * (len(header) - 2))
    for name, row in summary["variants"].items():
        lo, hi = row["overhead_ci95_ns"]
        print(
            f"  {name:<20} {fmt_ns(row['median_ns']):>11} {fmt_ns(row['min_ns']):>11} "
            f"{fmt_ns(row['overhead_ns']):>11} {fmt_ns(lo):>11}..{fmt_ns(hi):<10} {row['ratio']:>6.2f}x"
        )


def print_derived(derived: dict[str, Any], alloc: dict[str, dict[str, float]] | None) -> None:
    for name, title in (("success", "trivial program"), ("dspy", "dspy.Predict")):
        if name in derived:
            s = derived[name]
            print(f"\nAttribution, {title} (paired medians):")
            print(f"  Pipeline itself over bare await     {fmt_ns(s['pipeline_over_bare_ns']):>10}")
            for layer, ns in s["layer_over_pipeline_ns"].items():
                print(f"  + {layer:<33} {fmt_ns(ns):>10}")
            print(f"  = sum of layers alone               {fmt_ns(s['sum_of_layers_ns']):>10}")
            print(f"  stack over Pipeline (measured)      {fmt_ns(s['stack_over_pipeline_ns']):>10}")
            print(f"  stack over bare await               {fmt_ns(s['stack_over_bare_ns']):>10}")
    if "failure" in derived:
        f = derived["failure"]
        print("\nPer failed attempt, (t(k) - t(0)) / k (paired medians):")
        for name, ns in f["per_failed_attempt_ns"].items():
            print(f"  {name:<33} {fmt_ns(ns):>10}")
        print(f"  of which: program raises, caller catches       {fmt_ns(f['program_raise_ns']):>10}")
        print(f"  of which: asyncio.sleep(0) = one loop turn     {fmt_ns(f['sleep0_loop_turn_ns']):>10}")
        print(f"  rest: Retry bookkeeping + stack re-entry       {fmt_ns(f['retry_bookkeeping_ns']):>10}")
    if "dspy" in derived:
        d = derived["dspy"]
        print("\nIn proportion to a real DSPy call:")
        print(f"  dspy.Predict on FaultInjectingLM, bare           {fmt_ns(d['predict_bare_ns']):>10}")
        print(f"  stack overhead measured on Predict / Predict      {d['stack_overhead_pct_of_predict']:>9.2f}%")
        if "trivial_loop_stack_overhead_pct_of_predict" in d:
            pct = d["trivial_loop_stack_overhead_pct_of_predict"]
            print(f"  stack overhead, trivial loop (warm) / Predict     {pct:>9.2f}%")
    if alloc:
        print("\nAllocations (tracemalloc, separate un-timed pass):")
        print(f"  {'variant':<12} {'peak bytes/call':>16} {'retained bytes/call':>20}")
        for name, row in alloc.items():
            print(f"  {name:<12} {row['peak_bytes_per_call']:>16,.0f} {row['retained_bytes_per_call']:>20,.2f}")


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    quick, smoke = args.quick, args.smoke
    plan: dict[str, Callable[[], Group]] = {
        "success": lambda: success_group(100, 3) if smoke else success_group(2000, 100 if quick else 500),
        "failure": lambda: failure_group(20, 3) if smoke else failure_group(500, 30 if quick else 250),
        "dspy": lambda: dspy_group(2, 3) if smoke else dspy_group(10, 100 if quick else 800),
    }
    groups: dict[str, Group] = {}
    summaries: dict[str, Any] = {}
    for name, build in plan.items():
        if name not in args.groups:
            continue
        group = build()
        started = time.perf_counter()
        await measure(group)
        groups[name] = group
        summaries[name] = summarize(group)
        summaries[name]["seconds"] = round(time.perf_counter() - started, 2)
        print_group(summaries[name])
    alloc = await alloc_pass(20 if smoke else 500 if quick else 2000) if "alloc" in args.groups else None
    derived = derive(groups, summaries)
    print_derived(derived, alloc)
    return {"groups": summaries, "derived": derived, "allocations": alloc}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (whole run ~15 s instead of ~60 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write every figure and raw sample to this file")
    parser.add_argument(
        "--groups", nargs="+", choices=GROUPS, default=list(GROUPS), help="run only these parts (default: all)"
    )
    args = parser.parse_args()
    started = time.perf_counter()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "dspy": dspy.__version__,
        "quick": args.quick,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    print(f"resilient_dspy overhead  {meta['date']}  Python {meta['python']}  dspy {meta['dspy']}  {meta['cpus']} CPUs")
    results = asyncio.run(main_async(args))
    meta["seconds"] = round(time.perf_counter() - started, 1)
    print(f"\nTotal {meta['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **results}, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
