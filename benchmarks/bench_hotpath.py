"""Micro-measurements of the pieces of resilient_dspy's hot path, and of candidate fixes (not applied).

Run ``python benchmarks/bench_hotpath.py [--quick] [--json out.json]``; see ``benchmarks/README.md``.

Synchronous pieces are timed with ``timeit`` (best of several repeats) inside a running event loop, so
``LoopClock`` works; asynchronous pieces are timed in batches, net of awaiting an empty coroutine. The
candidate replacement for ``Call.replace`` is patched onto the class only for the end-to-end comparison,
in this process; no library file is changed. This script reads private attributes and may need updating
when the library's internals change.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import statistics
import time
import timeit
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from resilient_dspy import Fallback, Pipeline, Retry, Static, Timeout, classify
from resilient_dspy.clock import LoopClock
from resilient_dspy.errors import ErrorInfo, ErrorKind, _retry_after
from resilient_dspy.middleware.retry import compute_delay
from resilient_dspy.pipeline import Call, CallRecord, Handler

_FIELDS = tuple(f.name for f in dataclasses.fields(Call))


async def program(question: str) -> str:
    """The trivial program."""
    return question


class Noop:
    """A middleware that only calls the next layer: the price of one layer of composition."""

    async def __call__(self, call: Call, next: Handler) -> Any:
        return await next(call)


def fast_replace(self: Call, **changes: Any) -> Call:
    """Candidate ``Call.replace``: copy the slots by hand, then apply ``changes`` (same result, no ``fields()``)."""
    new = Call.__new__(Call)
    new.inputs = self.inputs
    new.runtime = self.runtime
    new.record = self.record
    new.deadline = self.deadline
    new.attempt = self.attempt
    new.bypass_cache = self.bypass_cache
    new.partition_key = self.partition_key
    new.properties = self.properties
    for name, value in changes.items():
        setattr(new, name, value)
    return new


def sync_ns(stmt: str, env: dict[str, Any], number: int, repeat: int) -> float:
    """Best-of-``repeat`` ns per execution of ``stmt``."""
    return min(timeit.Timer(stmt, globals=env).repeat(repeat, number)) / number * 1e9


async def async_ns(make: Callable[[], Awaitable[Any]], number: int, repeat: int) -> float:
    """Best-of-``repeat`` ns per ``await make()``, a loop turn included at the end of each batch."""
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter_ns()
        for _ in range(number):
            await make()
        await asyncio.sleep(0)
        best = min(best, (time.perf_counter_ns() - start) / number)
    return best


async def nothing() -> None:
    """The empty coroutine that async figures are net of."""


async def measure(quick: bool, smoke: bool = False) -> dict[str, Any]:
    number, repeat = (500, 1) if smoke else (20_000, 5) if quick else (100_000, 7)
    loop = asyncio.get_running_loop()
    pipe = Pipeline(program)
    call = pipe.new_call({"question": "q"})
    retry = Retry(4, base_delay=0, jitter="none", budget=None)
    budgeted = Retry(3)
    assert budgeted._budget is not None
    conn, server = ConnectionError("x"), dspy.LMServerError("x", status=503)
    assert fast_replace(call, deadline=1.0) == call.replace(deadline=1.0)
    env: dict[str, Any] = {
        "asyncio": asyncio,
        "os": os,
        "loop": loop,
        "clock": LoopClock(),
        "pipe": pipe,
        "call": call,
        "Call": Call,
        "CallRecord": CallRecord,
        "runtime": pipe._runtime,
        "fast_replace": fast_replace,
        "ErrorInfo": ErrorInfo,
        "ErrorKind": ErrorKind,
        "classify": classify,
        "_retry_after": _retry_after,
        "conn": conn,
        "server": server,
        "compute_delay": compute_delay,
        "options": retry.options,
        "uniform": pipe._runtime.rng.uniform,
        "budget": budgeted._budget,
    }
    sync_items = [
        ("loop.time()", "loop.time()", "what LoopClock.now() wraps"),
        ("asyncio.get_running_loop()", "asyncio.get_running_loop()", "3.11: a getpid() syscall each time"),
        ("os.getpid()", "os.getpid()", "the syscall alone"),
        ("LoopClock().now()", "clock.now()", "new_call, Timeout, Retry budget: 1 each"),
        ("CallRecord(t)", "CallRecord(0.0)", ""),
        ("Call(...)", "Call({}, runtime, None, properties={})", "slots dataclass __init__"),
        ("Pipeline.new_call()", "pipe.new_call({})", "now() + CallRecord + Call + {}"),
        ("call.replace(deadline=)", "call.replace(deadline=1.0)", "dataclasses.replace; Timeout, per call"),
        ("candidate fast_replace", "fast_replace(call, deadline=1.0)", "hand-copied slots"),
        ("call.replace(attempt=,bypass=)", "call.replace(attempt=2, bypass_cache=False)", "Retry, per retry"),
        ("candidate, same", "fast_replace(call, attempt=2, bypass_cache=False)", ""),
        ("ErrorInfo(...)", "ErrorInfo(ErrorKind.TRANSPORT, retryable=True)", "frozen: object.__setattr__ x4"),
        ("_retry_after(error)", "_retry_after(conn)", ""),
        ("classify(ConnectionError)", "classify(conn)", "per failed attempt; 13 checks first"),
        ("classify(LMServerError)", "classify(server)", "per failed attempt"),
        ("compute_delay(...)", "compute_delay(options, 1, 0.0, uniform)", "per failed attempt"),
        ("budget.record_call(now())", "budget.record_call(clock.now())", "Retry with a budget, per call"),
        ("budget.record_call(t)", "budget.record_call(0.5)", "without the clock read"),
        ("budget.try_spend(t)", "budget.try_spend(0.5)", "Retry with a budget, per retry"),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for label, stmt, note in sync_items:
        rows[label] = {"ns": sync_ns(stmt, env, number, repeat), "note": note}

    base = await async_ns(nothing, number // 5, repeat)
    stack = Pipeline(program, Fallback(Static(answer="x")), Timeout(10), Retry(3))
    noop1, noop8 = Pipeline(program, Noop()), Pipeline(program, *[Noop() for _ in range(8)])

    async def timeout_scope() -> None:
        async with asyncio.timeout_at(loop.time() + 10):
            await nothing()

    async def timer() -> None:
        loop.call_at(loop.time() + 10, nothing).cancel()

    async_items: list[tuple[str, Callable[[], Awaitable[Any]], str]] = [
        ("bare await program()", lambda: program(question="q"), ""),
        ("target(call)", lambda: pipe.target(call), "CallableTarget: attempts += 1, **inputs"),
        ("pipeline.run(call)", lambda: pipe.run(call), "no middleware, call prebuilt"),
        ("pipeline(question=)", lambda: pipe(question="q"), "no middleware"),
        ("Pipeline(program, Noop())", lambda: noop1(question="q"), ""),
        ("Pipeline(program, 8 x Noop())", lambda: noop8(question="q"), ""),
        ("async with timeout_at(...)", timeout_scope, "asyncio.Timeout, pure Python in 3.11"),
        ("loop.call_at(...).cancel()", timer, "the timer inside it"),
        ("asyncio.sleep(0)", lambda: asyncio.sleep(0), "one loop turn"),
        ("the production stack", lambda: stack(question="q"), "Fallback > Timeout > Retry"),
    ]
    for label, make, note in async_items:
        rows[label] = {"ns": await async_ns(make, number // 5, repeat) - base, "note": f"net; {note}".rstrip("; ")}
    rows["per Noop layer"] = {
        "ns": (rows["Pipeline(program, 8 x Noop())"]["ns"] - rows["pipeline(question=)"]["ns"]) / 8,
        "note": "closure + coroutine + await",
    }

    # End to end: the production stack with Call.replace as shipped vs the candidate. Patching a class
    # attribute invalidates CPython's specialised bytecode, so switch rarely: blocks in ABBA order (drift
    # cancels), 10 batches per block, the first of each block dropped as warm-up.
    original = Call.replace
    samples: dict[str, list[float]] = {"A": [], "B": []}
    try:
        for block in "ABBA" * (1 if smoke else 2 if quick else 5):
            Call.replace = original if block == "A" else fast_replace  # type: ignore[method-assign]
            times = [await async_ns(lambda: stack(question="q"), 2000, 1) for _ in range(10)]
            samples[block].extend(times[1:])
    finally:
        Call.replace = original  # type: ignore[method-assign]
    shipped, candidate = statistics.median(samples["A"]), statistics.median(samples["B"])
    end_to_end = {"stack_ns_shipped": shipped, "stack_ns_fast_replace": candidate, "saving_ns": shipped - candidate}
    return {"rows": rows, "empty_await_ns": base, "replace_end_to_end": end_to_end}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~10 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    results = asyncio.run(measure(args.quick, args.smoke))
    print(f"{'piece':<32} {'ns':>8}  note")
    print("-" * 90)
    for label, row in results["rows"].items():
        print(f"{label:<32} {row['ns']:>8,.0f}  {row['note']}")
    e2e = results["replace_end_to_end"]
    print(
        f"\nProduction stack per call, Call.replace shipped vs candidate (ABBA blocks, medians): "
        f"{e2e['stack_ns_shipped']:,.0f} ns vs {e2e['stack_ns_fast_replace']:,.0f} ns, "
        f"saving {e2e['saving_ns']:,.0f} ns"
    )
    if args.json:
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), **results}, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
