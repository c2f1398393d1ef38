"""Attribution profile of resilient_dspy's overhead: where each µs goes, next to the floor and the cheapest peer.

Run ``python benchmarks/bench_hotpath.py [--quick] [--smoke] [--json out.json]``; see ``benchmarks/README.md``.
The floor (the least code that does a pattern correctly), our layer options, the full stack (``our_stack``), the
peers and the gated concurrency round are ``bench_peers.py``'s, so the figures line up with its report.

1. **Synchronous pieces, ns** per execution: ``timeit``, best of several repeats, inside a running event loop
   (so ``LoopClock`` works). Not net of anything (an empty ``timeit`` loop costs ~10 ns).
2. **Each layer alone, µs** per call, success path, trivial program: batches of sequential awaits, variants
   interleaved round-robin, order rotated each round (``bench_overhead.measure``). A figure is the median over
   rounds of a per-round *paired* difference, ``X - bare await program()``, or for "ours" (the layer alone)
   ``Pipeline(program, layer) - Pipeline(program)``; in brackets, the difference of the two variants' best
   rounds. The cheapest peer per pattern is picked by a pre-pass (best of 3 batches). The full stack is shown
   next to ``Pipeline + the sum of its layers alone``, so the attribution can be checked.
3. **Concurrent calls, µs** per task: N tasks through the full stack all in flight (the program waits on a
   gate), then released; wall time / N, GC on and off, with the collections per round. Then, untimed, under
   ``tracemalloc``: traced bytes per in-flight call by file (an allocation counts for the file of the Python
   line that made it: every layer's coroutine for ``core/pipeline.py``, where ``_bind`` creates it, the outermost
   one for this script) and one task's chain of coroutine objects.

It reads private attributes (``Cache._keys``, ``Cache._serializer``, ``Pipeline._runtime``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import hashlib
import json
import os
import statistics
import sys
import time
import timeit
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
sys.path.insert(0, str(Path(__file__).parent))

import bench_peers as bp
import dspy
from bench_guards import fresh, same
from bench_overhead import Group, Runner, Variant, measure, time_batch

from resilient_dspy import Cache, Pipeline
from resilient_dspy.binding.settings import setting  # noqa: F401
from resilient_dspy.binding.usage import usage_scope  # noqa: F401
from resilient_dspy.core.call import Call, CallRecord  # noqa: F401
from resilient_dspy.core.clock import LoopClock
from resilient_dspy.errors import classify  # noqa: F401
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.middleware.cache.keys import KEY_VERSION, _dumps

program = bp.program
KINDS = ("timeout", "retry", "breaker", "bulkhead", "limiter", "cache/miss", "cache/hit")
HIT: tuple[str, ...] = ("KeyBuilder.key(inputs)", "get_nowait, no TTL", "CacheSerializer.loads(...)")
MISS = (*HIT[:1], "get_nowait, missing key", "asyncio.get_running_loop()", "loop.create_future()")
MISS += ("usage_scope() + by_model/total", "CacheSerializer.dumps(...)", "set_nowait, no TTL")
CACHE_PIECES = {"cache/hit": HIT, "cache/miss": MISS}  # the section-1 pieces each path runs; the rest is glue
SIZES = {  # sync (number, repeat); layers (batch, rounds); concurrency (tasks, rounds)
    "smoke": ((500, 1), (20, 3), (200, 1)),
    "quick": ((20_000, 5), (500, 100), (2_000, 5)),
    "full": ((100_000, 7), (1_000, 100), (10_000, 5)),
}


def us(ns: float) -> str:
    return f"{ns / 1000:,.2f}"


def cell(row: dict[str, Any]) -> str:
    """``median (min)`` in µs, 15 characters wide."""
    return f"{us(row['median_ns']):>7} ({us(row['min_ns']):>5})"


def sync_pieces(number: int, repeat: int) -> dict[str, dict[str, Any]]:
    """ns per execution of each piece, best of ``repeat``; call inside a running loop."""
    pipe = Pipeline(program, Cache())
    cache: Any = pipe.layers[0]
    keys, serializer = cache._keys, cache._serializer
    inputs = {"question": "hello"}
    text = f'[{KEY_VERSION},["function",{keys._function},null,null],{_dumps(inputs)}]'  # what key() hashes here
    key = keys.key(inputs)
    assert key.endswith(hashlib.sha256(text.encode()).hexdigest()), "KeyBuilder.key no longer hashes this text"
    data = serializer.dumps("hello", {}, 0)
    backend = MemoryBackend()
    backend.set_nowait(key, data, 3600.0)
    backend.set_nowait("no-ttl", data, None)
    loop, clock, runtime, record = asyncio.get_running_loop(), LoopClock(), pipe._runtime, CallRecord(0.0)
    call, sha256 = pipe.new_call(inputs), hashlib.sha256
    conn, server = ConnectionError("x"), dspy.LMServerError("x", status=503)
    env = {**globals(), **locals()}
    scope = "with usage_scope() as scope:\n    pass\nscope.total_tokens(scope.by_model())"
    items = [
        ("asyncio.get_running_loop()", "asyncio.get_running_loop()", "3.11: a getpid() syscall each time"),
        ("loop.time()", "loop.time()", "what LoopClock.now() wraps"),
        ("LoopClock().now()", "clock.now()", "get_running_loop() + loop.time()"),
        ("CallRecord(t)", "CallRecord(0.0)", "every call"),
        ("Call(...)", "Call(inputs, runtime, record)", "every call (slots dataclass)"),
        ("Pipeline.new_call()", "pipe.new_call(inputs)", "now() + CallRecord + Call; __call__ inlines it"),
        ("call.with_deadline(x)", "call.with_deadline(1.0)", "Timeout, every call"),
        ("call.for_attempt(2, False)", "call.for_attempt(2, False)", "Retry, every retry"),
        ("classify(ConnectionError)", "classify(conn)", "Retry, every failed attempt"),
        ("classify(LMServerError 503)", "classify(server)", "Retry, every failed attempt"),
        ('setting("lm")', 'setting("lm")', "key() reads 2 settings (lm, adapter)"),
        ("usage_scope() + by_model/total", scope, "Cache, every miss"),
        ("KeyBuilder.key(inputs)", "keys.key(inputs)", "Cache, every call"),
        ("  compact_json(inputs)", "_dumps(inputs)", "part of key()"),
        ("  sha256(text).hexdigest()", "sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()", "part of key()"),
        ("CacheSerializer.dumps(...)", 'serializer.dumps("hello", {}, 0)', "Cache, every miss"),
        ("CacheSerializer.loads(...)", "serializer.loads(data)", "Cache, every hit"),
        ("MemoryBackend.get_nowait", "backend.get_nowait(key)", "every call; a TTL entry reads the clock"),
        ("  get_nowait, no TTL", 'backend.get_nowait("no-ttl")', "hit, ttl=None (as in section 2)"),
        ("  get_nowait, missing key", 'backend.get_nowait("missing")', "miss"),
        ("MemoryBackend.set_nowait", "backend.set_nowait(key, data, 3600.0)", "every miss; with a TTL"),
        ("  set_nowait, no TTL", 'backend.set_nowait("no-ttl", data, None)', "miss, ttl=None (as in section 2)"),
        ("loop.create_future()", "loop.create_future()", "Cache, every miss (single-flight)"),
    ]
    rows: dict[str, dict[str, Any]] = {}
    for label, stmt, note in items:
        ns = min(timeit.Timer(stmt, globals=env).repeat(repeat, number)) / number * 1e9
        rows[label] = {"ns": ns, "note": note}
    parts = 2 * rows['setting("lm")']["ns"] + rows["  compact_json(inputs)"]["ns"]
    rest = rows["KeyBuilder.key(inputs)"]["ns"] - parts - rows["  sha256(text).hexdigest()"]["ns"]
    rows["  rest of key()"] = {"ns": rest, "note": "key() - 2 settings - json - sha256: f-strings, checks"}
    return rows


def runner(kind: str) -> Callable[[Any], Runner]:
    return same if kind.endswith("hit") else fresh


def peer(kind: str, name: str) -> bp.Program | None:
    dist, builder = bp.PEERS[kind.split("/")[0]][name]
    return bp.build_peer(dist, lambda: builder(program))


async def cheapest_peers(batch: int) -> dict[str, str]:
    """Per kind, the peer with the lowest best-of-3 batch time (a short pre-pass; it doubles as warm-up)."""
    best: dict[str, str] = {}
    for kind in KINDS:
        timings: dict[str, float] = {}
        for name in bp.PEERS[kind.split("/")[0]]:
            fn = peer(kind, name)
            if fn is not None and await bp.works(fn, name):
                timings[name] = min([await time_batch(runner(kind)(fn), batch) for _ in range(3)])
        if timings:
            best[kind] = min(timings, key=timings.__getitem__)
    return best


async def layer_group(batch: int, rounds: int, best: dict[str, str]) -> Group:
    async def wrapper(**kwargs: Any) -> Any:
        return await program(**kwargs)

    variants = [
        Variant("bare", fresh(program)),
        Variant("async def wrapper", fresh(wrapper)),
        Variant("Pipeline(program)", fresh(Pipeline(program))),
    ]
    for kind in KINDS:
        pattern, run = kind.split("/")[0], runner(kind)
        variants.append(Variant(f"{kind} ours", run(Pipeline(program, bp.our_layer(pattern)))))
        variants.append(Variant(f"{kind} floor", run(bp.FLOORS[pattern](program))))
        fn = peer(kind, best[kind]) if kind in best else None
        if fn is not None:
            variants.append(Variant(f"{kind} peer", run(fn)))
    no_flight = Cache(MemoryBackend(max_entries=10**7), ttl=None, single_flight=False)  # else as bp.our_layer
    variants.append(Variant("cache/miss ours, no single-flight", fresh(Pipeline(program, no_flight))))
    choice = {kind.split("/")[0]: name for kind, name in best.items() if kind != "cache/hit"}
    for kind in ("miss", "hit"):
        run = runner(kind)
        variants.append(Variant(f"stack/{kind} ours", run(bp.our_stack(program))))
        variants.append(Variant(f"stack/{kind} floor", run(bp.floor_stack(program))))
        composite = bp.peer_composite(choice)  # a fresh one per kind: hits and misses don't share a cache
        if composite is not None and await bp.works(composite, "best-of-breed peers"):
            variants.append(Variant(f"stack/{kind} peer", run(composite)))
    return Group("layers", "success path, trivial program", batch, rounds, variants)


def attribution(group: Group, best: dict[str, str]) -> dict[str, Any]:
    """Medians of per-round paired differences; ``min_ns`` is the difference of the two variants' best rounds."""
    raw = {v.name: v.samples for v in group.variants}
    low = {name: min(samples) for name, samples in raw.items()}
    pipe = "Pipeline(program)"

    def net(name: str, base: str = "bare") -> list[float]:
        return [x - y for x, y in zip(raw[name], raw[base], strict=True)]

    def row(name: str, base: str = "bare") -> dict[str, float]:
        return {"median_ns": statistics.median(net(name, base)), "min_ns": low[name] - low[base]}

    alone = {kind: net(f"{kind} ours", pipe) for kind in KINDS}
    rows: dict[str, Any] = {"async def wrapper": row("async def wrapper"), pipe: row(pipe)}
    for kind in KINDS:
        entry: dict[str, Any] = {"ours_alone": row(f"{kind} ours", pipe), "floor": row(f"{kind} floor")}
        gaps = [a - f for a, f in zip(alone[kind], net(f"{kind} floor"), strict=True)]
        entry["ours_alone_minus_floor_ns"] = statistics.median(gaps)
        if f"{kind} peer" in raw:
            entry["peer"] = {"name": best[kind], **row(f"{kind} peer")}
        rows[kind] = entry
    rows["single_flight"] = row("cache/miss ours", "cache/miss ours, no single-flight")
    for kind in ("miss", "hit"):
        layers = [k for k in KINDS if not k.startswith("cache")] + [f"cache/{kind}"]
        summed = [p + sum(alone[k][i] for k in layers) for i, p in enumerate(net(pipe))]
        summed_low = low[pipe] - low["bare"] + sum(low[f"{k} ours"] - low[pipe] for k in layers)
        ours, floor = net(f"stack/{kind} ours"), net(f"stack/{kind} floor")
        entry = {"ours": row(f"stack/{kind} ours"), "floor": row(f"stack/{kind} floor")}
        entry["sum_of_parts"] = {"median_ns": statistics.median(summed), "min_ns": summed_low}
        entry["ours_over_floor"] = statistics.median(o / f for o, f in zip(ours, floor, strict=True) if f > 0)
        entry["unattributed_ns"] = statistics.median(o - s for o, s in zip(ours, summed, strict=True))
        if f"stack/{kind} peer" in raw:
            entry["peer"] = {"name": "best-of-breed peers", **row(f"stack/{kind} peer")}
        rows[f"stack/{kind}"] = entry
    return rows


async def concurrency(n: int, rounds: int) -> dict[str, Any]:
    """µs per task for bare, floor and ours (full stack, misses), GC on and off, order rotated each round; and,
    with GC on, the collections per generation and the µs per task they took (``gc.callbacks``)."""
    makers = bp._gated_variants()
    names = list(makers)
    samples: dict[str, list[float]] = {f"{name} gc={mode}": [] for name in names for mode in ("on", "off")}
    collections = {name: [[0.0, 0.0] for _ in range(3)] for name in names}  # per generation: count, ns per task
    began = [0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.perf_counter_ns()
        elif current:
            entry = collections[current[0]][info["generation"]]
            entry[0] += 1 / rounds
            entry[1] += (time.perf_counter_ns() - began[0]) / rounds / n

    current: list[str] = []
    for name in names:  # warm-up
        await bp.concurrent_round(makers[name], min(n, 1000), f"warm-{name}")
    gc.collect()
    tracked = len(gc.get_objects())
    gc.callbacks.append(on_gc)
    try:
        for round_ in range(rounds):
            for i in range(len(names)):
                name = names[(round_ + i) % len(names)]
                for mode in ("on", "off") if round_ % 2 == 0 else ("off", "on"):
                    gc.collect()
                    current[:] = [name]
                    if mode == "off":
                        gc.disable()
                    try:
                        ns = await bp.concurrent_round(makers[name], n, f"r{round_}-{name}-{mode}")
                    finally:
                        gc.enable()
                        current.clear()
                    samples[f"{name} gc={mode}"].append(ns)
    finally:
        gc.callbacks.remove(on_gc)
    per_task = {k: {"median_ns": statistics.median(v), "min_ns": min(v)} for k, v in samples.items()}
    held = {name: await in_flight(makers[name], n) for name in names}
    result = {"tasks": n, "rounds": rounds, "ns_per_task": per_task, "gc_collections": collections}
    return result | {"gc_tracked_objects": tracked, "in_flight": held}


async def in_flight(make: Callable[[bp.Program], bp.Program], n: int) -> dict[str, Any]:
    """Traced bytes per in-flight call by file (untimed, under tracemalloc), and one task's coroutine chain."""
    gate = asyncio.Event()

    async def gated(question: str) -> str:
        await gate.wait()
        return question

    target = make(gated)
    questions = [f"mem-{time.perf_counter_ns()}-{i}" for i in range(n)]
    skip = [tracemalloc.Filter(False, tracemalloc.__file__)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.take_snapshot().filter_traces(skip)
        tasks = [asyncio.ensure_future(target(question=q)) for q in questions]
        for _ in range(3):
            await asyncio.sleep(0)
        after = tracemalloc.take_snapshot().filter_traces(skip)
    finally:
        tracemalloc.stop()
    chain: list[str] = []
    obj: Any = tasks[0].get_coro()
    while hasattr(obj, "cr_await"):  # the coroutine objects one task holds, outermost first
        chain.append(obj.__qualname__)
        obj = obj.cr_await
    gate.set()
    await asyncio.gather(*tasks)
    by_file: dict[str, float] = {}
    for diff in after.compare_to(before, "filename"):
        path = Path(diff.traceback[0].filename)
        name = f"{path.parent.name}/{path.name}"
        by_file[name] = by_file.get(name, 0.0) + diff.size_diff / n
    ordered = dict(sorted(by_file.items(), key=lambda item: -item[1]))
    return {"bytes": sum(by_file.values()), "by_file": ordered, "coroutines": chain}


def report(results: dict[str, Any]) -> None:
    print(f"\n1. Synchronous pieces, ns each (best of {results['sync_repeat']} x {results['sync_number']:,})")
    print(f"{'piece':<32} {'ns':>8}  note")
    for label, row in results["sync"].items():
        print(f"{label:<32} {row['ns']:>8,.0f}  {row['note']}")

    rows, (batch, rounds) = results["layers"], results["layers_size"]
    print(f"\n2. Each layer alone, µs per call, median (min) over {rounds} rounds of {batch} sequential calls")
    print("   ours = Pipeline(program, layer) - Pipeline(program); every other figure = X - bare await program()")
    print(f"{'row':<20} {'ours':>15} {'floor':>15} {'ours-floor':>10}  cheapest peer")
    for label in ("async def wrapper", "Pipeline(program)"):
        print(f"{label:<20} {cell(rows[label])}")
    for kind in KINDS:
        row, peer = rows[kind], rows[kind].get("peer")
        named = f"{peer['name']} {cell(peer).strip()}" if peer else "—"
        gap = us(row["ours_alone_minus_floor_ns"])
        print(f"{kind:<20} {cell(row['ours_alone'])} {cell(row['floor'])} {gap:>10}  {named}")
    print(f"full stack = {results['stack']}; its ours-floor column is the paired ratio ours / floor")
    for kind in ("miss", "hit"):
        row, peer = rows[f"stack/{kind}"], rows[f"stack/{kind}"].get("peer")
        named = f"best-of-breed peers {cell(peer).strip()}" if peer else "—"
        ratio = f"{row['ours_over_floor']:.2f}x"
        print(f"{'full stack, ' + kind:<20} {cell(row['ours'])} {cell(row['floor'])} {ratio:>10}  {named}")
        left = row["unattributed_ns"]
        share = left / max(row["ours"]["median_ns"], 1.0)
        verdict = "adds up" if abs(share) <= 0.1 else "does NOT add up (over 10 % apart)"
        summed = cell(row["sum_of_parts"])
        print(f"{'  Pipeline + Σ alone':<20} {summed}  stack - sum {us(left)} ({share:+.0%}): {verdict}")

    sync = {label.strip(): row["ns"] for label, row in results["sync"].items()}
    for kind, pieces in CACHE_PIECES.items():
        parts = " + ".join(f"{piece} {us(sync[piece])}" for piece in pieces)
        total, measured = sum(sync[piece] for piece in pieces), rows[kind]["ours_alone"]["median_ns"]
        print(f"{kind}, {us(measured)} µs alone, runs these section-1 pieces, {total / max(measured, 1):.0%} of it:")
        print(f"  {parts} = {us(total)} µs")
    flight = cell(rows["single_flight"]).strip()
    print(f"cache/miss, of which single-flight (paired, against single_flight=False): {flight} µs")

    conc = results["concurrency"]
    print(f"\n3. {conc['tasks']:,} concurrent calls through the full stack (misses), µs per task, median (min)")
    ns = conc["ns_per_task"]
    print(f"{'variant':<8} {'gc on':>15} {'gc off':>15} {'GC share':>9} {'extra over bare':>16}  GC by generation")
    for name in ("bare", "floor", "ours"):
        on, off = ns[f"{name} gc=on"], ns[f"{name} gc=off"]
        extra = us(on["median_ns"] - ns["bare gc=on"]["median_ns"])
        gens = ", ".join(f"{count:.4g}x {us(took)}" for count, took in conc["gc_collections"][name])
        print(f"{name:<8} {cell(on)} {cell(off)} {1 - off['median_ns'] / on['median_ns']:>9.0%} {extra:>16}  {gens}")
    tracked = conc["gc_tracked_objects"]
    print("GC by generation (0, 1, 2): collections per round x the µs per task they took. A gen-2 collection walks")
    print(f"every gc-tracked object: {tracked:,} before a round here (importing dspy alone makes ~80,000)")
    flight, ours = conc["in_flight"], conc["in_flight"]["ours"]
    totals = ", ".join(f"{name} {row['bytes']:,.0f}" for name, row in flight.items())
    top = list(ours["by_file"].items())[:6]
    top.append(("(other files)", ours["bytes"] - sum(size for _, size in top)))
    print(f"\nTraced bytes per in-flight call: {totals}. Ours by file:")
    print("\n".join(f"  {name:<36} {size:>8,.0f}" for name, size in top))
    counts = ", ".join(f"{name} {len(row['coroutines'])}" for name, row in flight.items())
    print(f"Coroutine objects per in-flight call: {counts}. Ours, outermost first:")
    print("  " + " ▶ ".join(ours["coroutines"]))


async def run(size: tuple[Any, ...]) -> dict[str, Any]:
    (number, repeat), (batch, rounds), (tasks, trounds) = size
    results: dict[str, Any] = {"sync_number": number, "sync_repeat": repeat, "layers_size": [batch, rounds]}
    results["sync"] = sync_pieces(number, repeat)
    results["stack"] = repr(bp.our_stack(program))
    best = results["cheapest_peers"] = await cheapest_peers(batch)
    group = await layer_group(batch, rounds, best)
    await measure(group)
    results["layers"] = attribution(group, best)
    del group  # its caches hold every miss so far: free them, lest section 3's gen-2 collections walk them too
    results["concurrency"] = await concurrency(tasks, trounds)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (~14 s; default ~40 s)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--json", type=Path, help="write the figures to this file")
    args = parser.parse_args()
    label = "smoke" if args.smoke else "quick" if args.quick else "full"
    started = time.perf_counter()
    results = asyncio.run(run(SIZES[label]))
    results["meta"] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "size": label, "python": sys.version.split()[0]}
    results["meta"]["seconds"] = round(time.perf_counter() - started, 1)
    report(results)
    if bp.SKIPPED:
        print("Skipped: " + "; ".join(f"{k} ({v})" for k, v in bp.SKIPPED.items()))
    print(f"\n{label} run: {results['meta']['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
