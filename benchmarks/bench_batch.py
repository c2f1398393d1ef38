"""Batches: ``pipeline.map`` next to hand-written ``gather`` + ``Semaphore``, its memory at 100k and 1M inputs, and
``dspy.Evaluate`` next to ``pipeline.map`` on a faulty LM.

Run ``python benchmarks/bench_batch.py [--quick] [--smoke] [--json out.json] [--write-docs docs/benchmarks.md]``.

(a) Throughput, one event loop: ``Pipeline(echo)`` (``async def echo(question): return question``, no latency, so
the figure is the batch machinery's cost) over N questions with ``pipeline.map(questions, concurrency=C)`` and with
the code users write by hand, ``asyncio.gather`` of one task per question each under an ``asyncio.Semaphore(C)``
and a ``try/except``. Variants alternate, order rotated every round; figures are µs per item (median and min over
rounds), the ratio is the median of per-round ratios.

(b) Peak memory: each variant runs in a fresh interpreter over a generator of N questions; the figure is how much
its resident memory grew at most during the batch (``/proc/self/statm``, sampled every 2 ms and at the end, so
Linux only). ``imap`` holds only the window; ``map`` holds its list of outcomes; ``gather`` creates one task per
input up front (run at 100k only).

(c) 1,000 ``dspy.Example``s through ``dspy.ChainOfThought`` on a ``FaultInjectingLM`` that fails 10 % of requests
(rate limits with a short Retry-After, 5xx, timeouts) with 10-30 ms of real latency: ``dspy.Evaluate`` (16
threads; with DSPy's default ``max_errors`` and with it raised past the faults) against ``pipeline.map``
(concurrency 16) of the bare program and of a ``Timeout ▶ Retry`` pipeline. Wall time (real seconds) and how many
examples end with an answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="bench-batch-dspy-"))

import dspy

from resilient_dspy import Pipeline, Retry, Timeout
from resilient_dspy.testing import FaultInjectingLM

MARK = "<!-- bench_batch.py: everything below is written by `python benchmarks/bench_batch.py --write-docs` -->"


async def echo(question: str) -> str:
    return question


# ------------------------------------------------------------------------------------------ (a) throughput


async def by_map(pipeline: Pipeline, questions: list[str], concurrency: int) -> int:
    outcomes = await pipeline.map(questions, concurrency=concurrency)
    return sum(outcome.ok for outcome in outcomes)


async def by_gather(pipeline: Pipeline, questions: list[str], concurrency: int) -> int:
    gate = asyncio.Semaphore(concurrency)

    async def one(question: str) -> Any:
        async with gate:
            try:
                return await pipeline(question)
            except Exception as error:
                return error

    results = await asyncio.gather(*(one(question) for question in questions))
    return sum(not isinstance(result, Exception) for result in results)


Runner = Callable[[Pipeline, list[str], int], Awaitable[int]]


async def throughput(count: int, rounds: int, concurrencies: tuple[int, ...]) -> list[dict[str, Any]]:
    pipeline = Pipeline(echo)
    questions = [f"question {i}" for i in range(count)]
    variants: dict[str, Runner] = {"map": by_map, "gather+Semaphore": by_gather}
    rows = []
    for concurrency in concurrencies:
        seconds: dict[str, list[float]] = {name: [] for name in variants}
        for round_ in range(rounds):
            names = list(variants)[round_ % 2 :] + list(variants)[: round_ % 2]
            for name in names:
                started = time.perf_counter()
                answered = await variants[name](pipeline, questions, concurrency)
                seconds[name].append(time.perf_counter() - started)
                assert answered == count
        ratios = [m / g for m, g in zip(seconds["map"], seconds["gather+Semaphore"], strict=True)]
        row: dict[str, Any] = {"concurrency": concurrency, "items": count, "ratio": statistics.median(ratios)}
        for name, values in seconds.items():
            row[name] = {"median_us": statistics.median(values) / count * 1e6, "min_us": min(values) / count * 1e6}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ (b) peak memory

_MEMORY_CHILD = """
import asyncio, os, sys
from resilient_dspy import Pipeline

PAGE = os.sysconf("SC_PAGE_SIZE")


def resident() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE


async def echo(question: str) -> str:
    return question


async def main(mode: str, count: int) -> None:
    pipeline = Pipeline(echo)
    await pipeline.map(["warm-up"] * 1000, concurrency=16)
    before = peak = resident()

    async def sample() -> None:
        nonlocal peak
        while True:
            peak = max(peak, resident())
            await asyncio.sleep(0.002)

    sampler = asyncio.create_task(sample())
    await asyncio.sleep(0)
    questions = (f"question {i}" for i in range(count))
    if mode == "imap":
        async for _ in pipeline.imap(questions, concurrency=16):
            pass
    elif mode == "map":
        outcomes = await pipeline.map(questions, concurrency=16)
    else:
        gate = asyncio.Semaphore(16)

        async def one(question: str) -> object:
            async with gate:
                return await pipeline(question)

        results = await asyncio.gather(*(one(q) for q in questions))
    peak = max(peak, resident())
    sampler.cancel()
    print(peak - before)

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


def peak_memory(sizes: tuple[int, ...]) -> list[dict[str, Any]]:
    """MiB the resident memory grew by at most, per variant and size, each in a fresh interpreter."""
    rows = []
    root = str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    for mode in ("imap", "map", "gather+Semaphore"):
        for size in sizes:
            if mode == "gather+Semaphore" and size > 100_000:
                continue
            started = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", _MEMORY_CHILD, mode, str(size)],
                capture_output=True,
                text=True,
                env=env,
                check=True,
            )
            grown = int(done.stdout.split()[-1])
            rows.append(
                {
                    "variant": mode,
                    "items": size,
                    "peak_growth_mib": grown / 2**20,
                    "wall_s": time.perf_counter() - started,
                }
            )
    return rows


# ------------------------------------------------------------------------------------------ (c) Evaluate

FAULTS = {
    "rate_limit": 0.04,
    "server_error": 0.04,
    "timeout": 0.02,
    "retry_after": (0.05, 0.2),
    "latency": (0.01, 0.03),
}


def _answered(prediction: Any) -> bool:
    return bool(getattr(prediction, "answer", None))


def _metric(example: Any, prediction: Any, trace: Any = None) -> float:
    return float(_answered(prediction))


def evaluate_row(devset: list[Any], max_errors: int | None, seed: int) -> dict[str, Any]:
    lm = FaultInjectingLM(profile=FAULTS, seed=seed)
    program = dspy.ChainOfThought("question -> answer")
    evaluate = dspy.Evaluate(devset=devset, metric=_metric, num_threads=16, max_errors=max_errors)
    started = time.perf_counter()
    try:
        with dspy.context(lm=lm):
            result = evaluate(program)
    except Exception as error:
        return {
            "answered": 0,  # the caller gets no result at all
            "wall_s": time.perf_counter() - started,
            "ended": f"raised {type(error).__name__}: {str(error)[:80]}",
            "lm_calls": lm.requests,
        }
    answered = sum(_answered(prediction) for _, prediction, _ in result.results)
    return {"answered": answered, "wall_s": time.perf_counter() - started, "ended": "finished", "lm_calls": lm.requests}


async def map_row(devset: list[Any], layers: tuple[Any, ...], seed: int) -> dict[str, Any]:
    lm = FaultInjectingLM(profile=FAULTS, seed=seed)
    pipeline = Pipeline(dspy.ChainOfThought("question -> answer"), *layers)
    started = time.perf_counter()
    with dspy.context(lm=lm):
        outcomes = await pipeline.map(devset, concurrency=16)
    answered = sum(outcome.ok and _answered(outcome.value) for outcome in outcomes)
    return {"answered": answered, "wall_s": time.perf_counter() - started, "ended": "finished", "lm_calls": lm.requests}


def evaluate_vs_map(count: int, seed: int) -> list[dict[str, Any]]:
    logging.getLogger("dspy").setLevel(logging.CRITICAL)  # Evaluate logs every failed example
    devset = [dspy.Example(question=f"Question {i}: what is DSPy?").with_inputs("question") for i in range(count)]
    retry = (Timeout(30.0), Retry(4, base_delay=0.05, max_delay=0.5, max_retry_after=0.5), Timeout(5.0))
    rows = [
        {"variant": "dspy.Evaluate, 16 threads (max_errors: DSPy's default, 10)", **evaluate_row(devset, None, seed)},
        {"variant": f"dspy.Evaluate, 16 threads, max_errors={count}", **evaluate_row(devset, count, seed)},
        {"variant": "pipeline.map, concurrency 16: Pipeline(program)", **asyncio.run(map_row(devset, (), seed))},
        {
            "variant": "pipeline.map, concurrency 16: Timeout(30) ▶ Retry(4) ▶ Timeout(5)",
            **asyncio.run(map_row(devset, retry, seed)),
        },
    ]
    return rows


# ------------------------------------------------------------------------------------------ report


def markdown(report: dict[str, Any]) -> list[str]:
    lines = [
        MARK,
        "",
        "## Batches: `pipeline.map` (`bench_batch.py`)",
        "",
        f"Run {report['when']} · `{report['command']}` · {report['seconds']:.1f} s · {report['machine']}",
        "",
        "Throughput over a no-latency program (`Pipeline(echo)`), µs per item, against `asyncio.gather` of one task "
        "per input under an `asyncio.Semaphore` (the hand-written batch), same concurrency, same run:",
        "",
        "| concurrency | items | `map` median (min) µs | `gather+Semaphore` median (min) µs | map / gather |",
        "|---:|---:|---:|---:|---:|",
    ]
    for row in report["throughput"]:
        mapped, gathered = row["map"], row["gather+Semaphore"]
        lines.append(
            f"| {row['concurrency']} | {row['items']:,} | {mapped['median_us']:.2f} ({mapped['min_us']:.2f}) | "
            f"{gathered['median_us']:.2f} ({gathered['min_us']:.2f}) | {row['ratio']:.2f}x |"
        )
    worst = max(row["ratio"] for row in report["throughput"])
    verdict = "holds" if worst <= 1.1 else "does not hold"
    lines += ["", f"Target: `map` within 1.1x the time of `gather+Semaphore`: {verdict} (at most {worst:.2f}x)."]
    lines += [
        "",
        "Peak memory: how much the resident memory grew at most during a batch over a generator of questions "
        "(a fresh process each, sampled every 2 ms):",
        "",
        "| variant | items | peak growth MiB |",
        "|---|---:|---:|",
    ]
    for row in report["memory"]:
        lines.append(f"| {row['variant']} | {row['items']:,} | {row['peak_growth_mib']:.1f} |")
    lines += [
        "",
        "`imap` keeps only its window, so it stays flat; `map` grows with the list of outcomes it returns; the "
        "hand-written `gather` with its one task per input, created up front.",
    ]
    lines += [
        "",
        f"`dspy.Evaluate` and `pipeline.map` over the same {report['examples']:,} examples, `dspy.ChainOfThought` on "
        f"`FaultInjectingLM(profile={FAULTS})` (10 % of requests fail), real time:",
        "",
        "| variant | ended | examples answered | LM requests | wall s |",
        "|---|---|---:|---:|---:|",
    ]
    for row in report["evaluate"]:
        answered = f"{row['answered']:,}"
        lines.append(f"| {row['variant']} | {row['ended']} | {answered} | {row['lm_calls']:,} | {row['wall_s']:.2f} |")
    return lines


def write_docs(path: Path, lines: list[str]) -> None:
    """Replace this script's section of ``path`` (from its marker to the end), or append it."""
    text = path.read_text()
    head = text.split(MARK)[0].rstrip("\n")
    path.write_text(head + "\n\n" + "\n".join(lines) + "\n")


def shown_arguments(argv: list[str]) -> list[str]:
    """The command line as the docs show it: without ``--json PATH``, which changes no figure."""
    shown, skip = [], False
    for argument in argv:
        if skip or argument == "--json":
            skip = not skip
            continue
        shown.append(argument)
    return shown


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes (about 40 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    parser.add_argument("--write-docs", type=Path, help="replace this script's section of docs/benchmarks.md")
    args = parser.parse_args()
    if args.smoke:
        count, rounds, sizes, examples = 2_000, 2, (2_000, 5_000), 40
    elif args.quick:
        count, rounds, sizes, examples = 20_000, 5, (20_000, 200_000), 300
    else:
        count, rounds, sizes, examples = 100_000, 7, (100_000, 1_000_000), 1_000
    started = time.perf_counter()
    report: dict[str, Any] = {
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python benchmarks/bench_batch.py", *shown_arguments(sys.argv[1:])]),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
        f"{platform.python_version()}, dspy {dspy.__version__}",
        "throughput": asyncio.run(throughput(count, rounds, (16, 100))),
        "memory": peak_memory(sizes),
        "examples": examples,
        "evaluate": evaluate_vs_map(examples, seed=5),
    }
    report["seconds"] = time.perf_counter() - started
    lines = markdown(report)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.write_docs:
        write_docs(args.write_docs, lines)
        print(f"Wrote {args.write_docs}")


if __name__ == "__main__":
    main()
