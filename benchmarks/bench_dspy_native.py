"""What DSPy-native use costs: sync calls through the background loop, Evaluate from 8 threads, time to first chunk.

Run ``python benchmarks/bench_dspy_native.py [--quick] [--smoke] [--json out.json]``.

All on a local ``FaultInjectingLM`` (no network, DSPy's cache off) around ``dspy.Predict("question -> answer")``,
the stack ``Timeout > RateLimiter > Retry > CircuitBreaker > Bulkhead > Timeout`` (limits far above the load):

1. *sync overhead*: ``module(question=...)`` from sync code (``pipeline.as_module()``, on the pipeline's background
   loop) next to calling the bare program sync; ``pipeline.sync(...)`` with no layers (DSPy's async path plus the
   hop), and with an ``async def`` echo for a program (the hop alone); per call, the median of rounds that
   alternate the variants.
2. *Evaluate*: ``dspy.Evaluate(num_threads=8)`` over 200 examples, the bare program then ``as_module()``, in the same
   run, alternating; with an LM answering at once (all overhead) and in 20 ms (a fast model); the wall-time ratio.
3. *time to first chunk*: ``dspy.streamify`` with a listener on ``answer``, the bare program next to the module
   through the stack (streamify's default sync path and ``is_async_program=True``): from the call to the first chunk
   the consumer sees, the median of rounds.
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
from collections.abc import Callable
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("DSPY_CACHEDIR", tempfile.mkdtemp(prefix="bench-dspy-native-"))

import dspy
from dspy.streaming import StreamListener, StreamResponse

from resilient_dspy import Bulkhead, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.testing import FaultInjectingLM


def stack(program: Any) -> Pipeline:
    return Pipeline(
        program,
        Timeout(60),
        RateLimiter(requests=1_000_000, per=1.0),
        Retry(3),
        CircuitBreaker(failure_threshold=1000),
        Bulkhead(max_concurrent=64),
        Timeout(30),
    )


def per_call(function: Callable[[str], Any], calls: int, round_: int) -> float:
    started = time.perf_counter()
    for index in range(calls):
        function(f"question {round_} {index}")
    return (time.perf_counter() - started) / calls


def sync_overhead(calls: int, rounds: int) -> dict[str, float]:
    """Microseconds per sync call: bare program, the module through the stack, and pipeline.sync with no layers."""
    program = dspy.Predict("question -> answer")
    module = stack(program).as_module()
    hop = Pipeline(program)

    async def echo(question: str) -> str:
        return question

    bare_hop = Pipeline(echo)
    variants: dict[str, Callable[[str], Any]] = {
        "bare program": lambda q: program(question=q),
        "as_module() through the stack": lambda q: module(question=q),
        "pipeline.sync, no layers": lambda q: hop.sync(q),
        "the loop hop alone (async def echo)": lambda q: bare_hop.sync(q),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}
    with dspy.context(lm=FaultInjectingLM()):
        for function in variants.values():
            per_call(function, max(1, calls // 10), -1)  # warm up: the loop started, DSPy's caches filled
        for round_ in range(rounds):
            order = list(variants.items())
            order = order[round_ % len(order) :] + order[: round_ % len(order)]
            for name, function in order:
                samples[name].append(per_call(function, calls, round_))
    for pipeline in (module.pipeline, hop, bare_hop):
        pipeline.portal.close()
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


def evaluate_ratio(examples: int, rounds: int, latency: float) -> dict[str, float]:
    """Wall seconds of Evaluate(num_threads=8) over ``examples``: bare, as_module(), and their ratio (median)."""
    devset = [dspy.Example(question=f"q{i}", answer="x").with_inputs("question") for i in range(examples)]
    evaluate = dspy.Evaluate(devset=devset, metric=lambda *args, **kwargs: 1.0, num_threads=8, max_errors=10_000)
    program = dspy.Predict("question -> answer")
    module = stack(program).as_module()
    lm = FaultInjectingLM(profile={"latency": (latency, latency)})
    times: dict[str, list[float]] = {"bare": [], "module": []}
    ratios = []
    with dspy.context(lm=lm):
        for _ in range(rounds):
            round_times = {}
            for name, target in (("bare", program), ("module", module)):
                started = time.perf_counter()
                evaluate(target)
                round_times[name] = time.perf_counter() - started
                times[name].append(round_times[name])
            ratios.append(round_times["module"] / round_times["bare"])
    module.pipeline.portal.close()
    return {
        "bare_s": statistics.median(times["bare"]),
        "module_s": statistics.median(times["module"]),
        "ratio": statistics.median(ratios),
    }


async def first_chunk(program: Any, is_async: bool) -> float:
    listeners = [StreamListener(signature_field_name="answer")]
    streamed = dspy.streamify(program, stream_listeners=listeners, is_async_program=is_async)
    started = time.perf_counter()
    seen = None
    async for value in streamed(question=f"stream {time.perf_counter_ns()}"):
        if seen is None and isinstance(value, StreamResponse):
            seen = time.perf_counter() - started
    assert seen is not None
    return seen


def time_to_first_chunk(rounds: int) -> dict[str, float]:
    """Milliseconds from the call to the first chunk: bare streamify and the module through the stack."""
    program = dspy.Predict("question -> answer")
    module = stack(program).as_module()
    variants = {
        "bare program (streamify, sync path)": (program, False),
        "bare program (streamify, async)": (program, True),
        "as_module() through the stack (sync path)": (module, False),
        "as_module() through the stack (async)": (module, True),
    }
    samples: dict[str, list[float]] = {name: [] for name in variants}

    async def run() -> None:
        with dspy.context(lm=FaultInjectingLM()):
            for target, is_async in variants.values():
                await first_chunk(target, is_async)  # warm up
            for round_ in range(rounds):
                order = list(variants.items())
                order = order[round_ % len(order) :] + order[: round_ % len(order)]
                for name, (target, is_async) in order:
                    samples[name].append(await first_chunk(target, is_async))

    asyncio.run(run())
    module.pipeline.portal.close()
    return {name: statistics.median(values) * 1e3 for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer calls and rounds")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: check that it runs")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    calls, rounds, examples, stream_rounds = (
        (20, 2, 16, 2) if args.smoke else (200, 5, 200, 10) if args.quick else (500, 9, 200, 30)
    )
    import logging

    logging.getLogger("dspy").setLevel(logging.WARNING)
    print(f"Python {platform.python_version()}, dspy {dspy.__version__}, {os.cpu_count()} CPUs")

    sync = sync_overhead(calls, rounds)
    print(f"\n1. sync call, µs per call (median of {rounds} rounds of {calls})")
    for name, micros in sync.items():
        print(f"   {name:<38} {micros:9.1f}")
    overhead = sync["as_module() through the stack"] - sync["bare program"]
    print(f"   {'overhead of as_module()':<38} {overhead:9.1f}")

    evaluated = {}
    print(f"\n2. dspy.Evaluate(num_threads=8), {examples} examples, median of {rounds} rounds")
    for latency in (0.0, 0.02):
        evaluated[latency] = figures = evaluate_ratio(examples, rounds, latency)
        print(
            f"   LM latency {latency * 1000:>3.0f} ms: bare {figures['bare_s']:.3f} s, as_module() "
            f"{figures['module_s']:.3f} s, ratio {figures['ratio']:.2f}"
        )

    ttfc = time_to_first_chunk(stream_rounds)
    print(f"\n3. time to first chunk, ms (median of {stream_rounds})")
    for name, millis in ttfc.items():
        print(f"   {name:<42} {millis:7.2f}")

    if args.json:
        with open(args.json, "w") as out:
            json.dump({"sync_us": sync, "evaluate": {str(k): v for k, v in evaluated.items()}, "ttfc_ms": ttfc}, out)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
