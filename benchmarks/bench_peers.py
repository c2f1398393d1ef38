"""resilient_dspy side by side with the Python resilience libraries and with a hand-rolled minimal floor.

Run ``python benchmarks/bench_peers.py [--quick] [--smoke] [--json out.json] [--write-docs docs/benchmarks.md]``.
The peers come from the ``[bench]`` extra (``pip install -e ".[bench]"``); a peer that is not installed or does not
import is skipped and named in the output. See ``benchmarks/README.md``.

Why: a reliability layer sits on every LM call, so it should cost no more than the libraries people would
otherwise reach for, and not much more than the least code that does the same job correctly (the *floor*: a
try/except retry loop, a counter breaker, an ``asyncio.Semaphore`` bulkhead, a deque sliding-window limiter,
a dict cache). The floor is the physical target; the peers are the market.

Method (the helpers are ``bench_overhead.py``'s): every timed comparison runs in one event loop, variants
interleaved round-robin with the order rotated every round; each sample is a batch of sequential awaits;
figures are the median and min over rounds, and every ratio is the median of per-round *paired* ratios of
overheads over the bare ``await`` (so drift on a shared machine cancels out). Limits never bind on the
success path: this is the cost of admission, not of waiting. The limiter, fairness and single-flight figures
reuse ``bench_limiter.py`` and ``bench_cache.py`` on the real loop clock; the chaos run uses looptime's virtual
clock (seconds of simulated provider latency and Retry-After take milliseconds).
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
from collections import deque
from collections.abc import Awaitable, Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

sys.path.insert(0, str(Path(__file__).parent))

import bench_cache
import dspy
from bench_guards import fresh, same
from bench_overhead import Flaky, Group, Variant, failing_calls, measure, summarize

from resilient_dspy import Bulkhead, Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.middleware.cache.backends import MemoryBackend

Program = Callable[..., Awaitable[Any]]
Wrap = Callable[[Program], Program]

BIG = 10**9  # a rate limit that never binds
PATTERNS = ("timeout", "limiter", "retry", "breaker", "bulkhead", "cache")  # our stack order, outermost first
PEER_PACKAGES = (
    "tenacity",
    "stamina",
    "backoff",
    "hyx",
    "aiobreaker",
    "purgatory",
    "circuitbreaker",
    "aiolimiter",
    "pyrate-limiter",
    "limits",
    "aiocache",
    "pyresilience",
)


async def program(question: str) -> str:
    """The trivial program: what is measured is the wrapper, not the program."""
    return question


# ------------------------------------------------------------------------------------------------- the floor


def floor_timeout(fn: Program) -> Program:
    """The floor timeout: ``asyncio.timeout`` (what any correct async timeout needs at least)."""

    async def call(**kwargs: Any) -> Any:
        async with asyncio.timeout(10):
            return await fn(**kwargs)

    return call


def floor_retry(fn: Program, attempts: int = 3, delay: float = 0.0) -> Program:
    """The floor retry: a try/except loop that sleeps ``delay`` (0 still yields one loop turn, as peers do)."""

    async def call(**kwargs: Any) -> Any:
        for attempt in range(1, attempts + 1):
            try:
                return await fn(**kwargs)
            except Exception:
                if attempt == attempts:
                    raise
            await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    return call


class FloorBreaker:
    """The floor breaker: consecutive failures, open for ``reset`` seconds, then one trial; no clock on success."""

    def __init__(self, threshold: int = 5, reset: float = 30.0) -> None:
        self.threshold = threshold
        self.reset = reset
        self.failures = 0
        self.opened_at = 0.0

    def wrap(self, fn: Program) -> Program:
        async def call(**kwargs: Any) -> Any:
            if self.failures >= self.threshold and time.monotonic() - self.opened_at < self.reset:
                raise RuntimeError("circuit open")
            try:
                result = await fn(**kwargs)
            except Exception:
                self.failures += 1
                if self.failures >= self.threshold:
                    self.opened_at = time.monotonic()
                raise
            self.failures = 0
            return result

        return call


def floor_bulkhead(fn: Program, limit: int = 10**6) -> Program:
    """The floor bulkhead: an ``asyncio.Semaphore``."""
    semaphore = asyncio.Semaphore(limit)

    async def call(**kwargs: Any) -> Any:
        async with semaphore:
            return await fn(**kwargs)

    return call


class FloorLimiter:
    """The floor limiter: a deque of admission times; never more than ``rate`` in any window of ``per``."""

    def __init__(self, rate: int = BIG, per: float = 1.0) -> None:
        self.rate = rate
        self.per = per
        self.stamps: deque[float] = deque()

    async def acquire(self) -> None:
        stamps = self.stamps
        while True:
            now = time.monotonic()
            while stamps and stamps[0] <= now - self.per:
                stamps.popleft()
            if len(stamps) < self.rate:
                stamps.append(now)
                return
            await asyncio.sleep(stamps[0] + self.per - now)

    def wrap(self, fn: Program) -> Program:
        async def call(**kwargs: Any) -> Any:
            await self.acquire()
            return await fn(**kwargs)

        return call


def floor_cache(fn: Program) -> Program:
    """The floor cache: a dict keyed by the inputs (no program identity, no TTL, no single-flight)."""
    store: dict[tuple[tuple[str, Any], ...], Any] = {}

    async def call(**kwargs: Any) -> Any:
        key = tuple(kwargs.items())
        if key in store:
            return store[key]
        result = store[key] = await fn(**kwargs)
        return result

    return call


def floor_stack(fn: Program) -> Program:
    """All six floors inline in one coroutine, in our stack's order: timeout, limiter, retry, breaker, bulkhead,
    cache. One function, not six wrappers: the least code there is."""
    limiter = FloorLimiter()
    semaphore = asyncio.Semaphore(10**6)
    breaker = FloorBreaker()
    store: dict[tuple[tuple[str, Any], ...], Any] = {}

    async def call(**kwargs: Any) -> Any:
        async with asyncio.timeout(10):
            await limiter.acquire()
            for attempt in range(1, 4):
                try:
                    if breaker.failures >= breaker.threshold and time.monotonic() - breaker.opened_at < breaker.reset:
                        raise RuntimeError("circuit open")
                    try:
                        async with semaphore:
                            key = tuple(kwargs.items())
                            if key in store:
                                result = store[key]
                            else:
                                result = store[key] = await fn(**kwargs)
                    except Exception:
                        breaker.failures += 1
                        if breaker.failures >= breaker.threshold:
                            breaker.opened_at = time.monotonic()
                        raise
                    breaker.failures = 0
                    return result
                except Exception:
                    if attempt == 3:
                        raise
                await asyncio.sleep(0)
        raise AssertionError("unreachable")

    return call


FLOORS: dict[str, Wrap] = {
    "timeout": floor_timeout,
    "retry": floor_retry,
    "breaker": lambda fn: FloorBreaker().wrap(fn),
    "bulkhead": floor_bulkhead,
    "limiter": lambda fn: FloorLimiter().wrap(fn),
    "cache": floor_cache,
}


# ------------------------------------------------------------------------------------------------------ ours


def our_layer(pattern: str) -> Any:
    """Our layer for ``pattern``, configured like the floor (limits never bind, retries without waiting)."""
    if pattern == "timeout":
        return Timeout(10)
    if pattern == "retry":
        return Retry(3, base_delay=0, jitter="none", budget=None)
    if pattern == "breaker":
        return CircuitBreaker(5)
    if pattern == "bulkhead":
        return Bulkhead(10**6)
    if pattern == "limiter":
        return RateLimiter(requests=BIG, per=1.0)
    return Cache(MemoryBackend(max_entries=10**7), ttl=None)


def our_stack(fn: Program) -> Pipeline:
    return Pipeline(fn, *(our_layer(pattern) for pattern in PATTERNS))


def our_stack_cache_first(fn: Program) -> Pipeline:
    """The same layers with the Cache outermost, the order pyresilience applies: a hit skips every guard."""
    return Pipeline(fn, our_layer("cache"), *(our_layer(pattern) for pattern in PATTERNS if pattern != "cache"))


# ----------------------------------------------------------------------------------------------------- peers
# Each builder imports its peer lazily, so a missing peer fails its own build only. Configuration mirrors the
# floor: 3 attempts, zero wait; a breaker threshold of 5; limits that never bind; an unbounded memory cache.


def _tenacity(fn: Program, attempts: int = 3) -> Program:
    import tenacity

    wrapped: Program = tenacity.retry(
        stop=tenacity.stop_after_attempt(attempts), wait=tenacity.wait_none(), reraise=True
    )(fn)
    return wrapped


def _stamina(fn: Program, attempts: int = 3) -> Program:
    import stamina
    import stamina.instrumentation

    # stamina logs every retry by default; with no logging configured that is a stderr write per attempt, which
    # would measure the terminal, not the library. Hooks off: the retry machinery alone, as for the others.
    stamina.instrumentation.set_on_retry_hooks([])
    wrapped: Program = stamina.retry(
        on=Exception, attempts=attempts, timeout=None, wait_initial=0.0, wait_max=0.0, wait_jitter=0.0
    )(fn)
    return wrapped


def _backoff(fn: Program, attempts: int = 3) -> Program:
    import backoff

    wrapped: Program = backoff.on_exception(backoff.constant, Exception, max_tries=attempts, interval=0, jitter=None)(
        fn
    )
    return wrapped


def _hyx_retry(fn: Program, attempts: int = 3) -> Program:
    from hyx.retry import retry

    wrapped: Program = retry(on=Exception, attempts=attempts - 1, backoff=0.0)(fn)
    return wrapped


def _pyresilience(**config: Any) -> Wrap:
    def build(fn: Program) -> Program:
        import pyresilience

        parts = {
            "retry": lambda: pyresilience.RetryConfig(max_attempts=config.get("attempts", 3), delay=0.0, jitter=False),
            "timeout": lambda: pyresilience.TimeoutConfig(seconds=10.0),
            "circuit_breaker": lambda: pyresilience.CircuitBreakerConfig(failure_threshold=5),
            "bulkhead": lambda: pyresilience.BulkheadConfig(max_concurrent=10**6),
            "rate_limiter": lambda: pyresilience.RateLimiterConfig(max_calls=BIG, period=1.0),
            "cache": lambda: pyresilience.CacheConfig(max_size=10**7, ttl=0.0),
        }
        wrapped: Program = pyresilience.resilient(**{name: parts[name]() for name in config["parts"]})(fn)  # type: ignore[call-overload,no-untyped-call]
        return wrapped

    return build


def _hyx_timeout(fn: Program) -> Program:
    from hyx.timeout import timeout

    wrapped: Program = timeout(10)(fn)  # type: ignore[type-var]
    return wrapped


def _aiobreaker(fn: Program) -> Program:
    from aiobreaker import CircuitBreaker as AioBreaker  # type: ignore[import-untyped]

    breaker = AioBreaker(fail_max=5)

    async def call(**kwargs: Any) -> Any:
        return await breaker.call_async(fn, **kwargs)

    return call


def _purgatory(fn: Program) -> Program:
    from purgatory import AsyncCircuitBreakerFactory

    factory = AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=30)
    wrapped: Program = factory(circuit="bench")(fn)
    return wrapped


def _circuitbreaker(fn: Program) -> Program:
    from circuitbreaker import circuit  # type: ignore[import-untyped]

    wrapped: Program = circuit(failure_threshold=5, recovery_timeout=30)(fn)
    return wrapped


def _hyx_breaker(fn: Program) -> Program:
    from hyx.circuitbreaker import consecutive_breaker

    wrapped: Program = consecutive_breaker(failure_threshold=5, recovery_time_secs=30)(fn)  # type: ignore[type-var]
    return wrapped


def _hyx_bulkhead(fn: Program) -> Program:
    from hyx.bulkhead import bulkhead

    wrapped: Program = bulkhead(max_concurrency=10**6, max_capacity=2 * 10**6)(fn)  # type: ignore[type-var]
    return wrapped


def _aiolimiter(fn: Program) -> Program:
    from aiolimiter import AsyncLimiter

    limiter = AsyncLimiter(BIG, 1.0)

    async def call(**kwargs: Any) -> Any:
        async with limiter:
            return await fn(**kwargs)

    return call


def _pyrate(fn: Program) -> Program:
    from pyrate_limiter import Duration, Limiter, Rate

    limiter = Limiter(Rate(BIG, Duration.SECOND))

    async def call(**kwargs: Any) -> Any:
        await limiter.try_acquire_async("bench")
        return await fn(**kwargs)

    return call


def _limits(fn: Program) -> Program:
    from limits import RateLimitItemPerSecond
    from limits.aio.storage import MemoryStorage
    from limits.aio.strategies import MovingWindowRateLimiter

    limiter = MovingWindowRateLimiter(MemoryStorage())
    item = RateLimitItemPerSecond(BIG)

    async def call(**kwargs: Any) -> Any:
        if not await limiter.hit(item, "bench"):
            raise RuntimeError("rate limited")
        return await fn(**kwargs)

    return call


def _hyx_limiter(fn: Program) -> Program:
    from hyx.ratelimit import tokenbucket

    wrapped: Program = tokenbucket(max_executions=BIG, per_time_secs=1, bucket_size=BIG)(fn)  # type: ignore[type-var]
    return wrapped


def _aiocache(fn: Program) -> Program:
    from aiocache import SimpleMemoryCache, cached  # type: ignore[import-untyped]

    wrapped: Program = cached(cache=SimpleMemoryCache, ttl=None)(fn)
    return wrapped


PEERS: dict[str, dict[str, tuple[str, Wrap]]] = {
    # pattern -> peer label -> (distribution name, builder)
    "timeout": {"hyx": ("hyx", _hyx_timeout), "pyresilience": ("pyresilience", _pyresilience(parts=["timeout"]))},
    "retry": {
        "tenacity": ("tenacity", _tenacity),
        "stamina": ("stamina", _stamina),
        "backoff": ("backoff", _backoff),
        "hyx": ("hyx", _hyx_retry),
        "pyresilience": ("pyresilience", _pyresilience(parts=["retry"])),
    },
    "breaker": {
        "aiobreaker": ("aiobreaker", _aiobreaker),
        "purgatory": ("purgatory", _purgatory),
        "circuitbreaker": ("circuitbreaker", _circuitbreaker),
        "hyx": ("hyx", _hyx_breaker),
        "pyresilience": ("pyresilience", _pyresilience(parts=["circuit_breaker"])),
    },
    "bulkhead": {
        "hyx": ("hyx", _hyx_bulkhead),
        "pyresilience": ("pyresilience", _pyresilience(parts=["bulkhead"])),
    },
    "limiter": {
        "aiolimiter": ("aiolimiter", _aiolimiter),
        "pyrate-limiter": ("pyrate-limiter", _pyrate),
        "limits": ("limits", _limits),
        "hyx": ("hyx", _hyx_limiter),
        "pyresilience": ("pyresilience", _pyresilience(parts=["rate_limiter"])),
    },
    "cache": {
        "aiocache": ("aiocache", _aiocache),
        "pyresilience": ("pyresilience", _pyresilience(parts=["cache"])),
    },
}
RETRY_PEERS: dict[str, tuple[str, Callable[[Program, int], Program]]] = {
    "tenacity": ("tenacity", _tenacity),
    "stamina": ("stamina", _stamina),
    "backoff": ("backoff", _backoff),
    "hyx": ("hyx", _hyx_retry),
    "pyresilience": ("pyresilience", lambda fn, attempts: _pyresilience(parts=["retry"], attempts=attempts)(fn)),
}

SKIPPED: dict[str, str] = {}


def build_peer(label: str, builder: Callable[[], Program]) -> Program | None:
    """Build one peer wrapper and smoke it once; None (and a note in ``SKIPPED``) if it won't install or run."""
    try:
        wrapped = builder()
        asyncio.get_running_loop()  # builders run inside the loop, as some peers need one
    except Exception as error:
        SKIPPED.setdefault(label, f"{type(error).__name__}: {error}")
        return None
    return wrapped


async def works(fn: Program, label: str) -> bool:
    """One call through ``fn``; a peer that fails it is skipped (and named), rather than mis-measured."""
    try:
        result = await fn(question="probe")
    except Exception as error:
        SKIPPED.setdefault(label, f"failed a call: {type(error).__name__}: {error}")
        return False
    if result != "probe":
        SKIPPED.setdefault(label, f"returned {result!r}")
        return False
    return True


# ------------------------------------------------------------------------------------------- (1) per layer


async def layer_group(batch: int, rounds: int) -> tuple[Group, dict[str, list[str]]]:
    """bare, Pipeline, then per pattern: floor, ours, each peer. Cache rows come as miss (fresh questions) and
    hit (one question); every other row uses fresh questions, like the bare baseline."""
    variants = [Variant("bare", fresh(program), "await program(question=f'q{i}')")]
    variants.append(Variant("pipeline", fresh(Pipeline(program)), "Pipeline(program), no layer"))
    rows: dict[str, list[str]] = {}
    for pattern in PATTERNS:
        kinds = ("cache/miss", "cache/hit") if pattern == "cache" else (pattern,)
        for kind in kinds:
            runner = same if kind == "cache/hit" else fresh
            names = []
            candidates: list[tuple[str, Program | None]] = [
                (f"{kind} floor", FLOORS[pattern](program)),
                (f"{kind} ours", Pipeline(program, our_layer(pattern))),
            ]
            for peer, (dist, builder) in PEERS[pattern].items():
                candidates.append((f"{kind} {peer}", build_peer(dist, lambda b=builder: b(program))))  # type: ignore[misc]
            for name, fn in candidates:
                if fn is not None and await works(fn, name.split(" ", 1)[1] if "floor" in name else name):
                    variants.append(Variant(name, runner(fn)))
                    names.append(name)
            rows[kind] = names
    return Group("layers", "Success path per layer, trivial program, ns per call", batch, rounds, variants), rows


# ------------------------------------------------------------------------------------------ (2) full stack

CACHE_FIRST = "ours, cache first"


def peer_composite(choice: dict[str, str]) -> Program | None:
    """The peers named in ``choice`` (pattern -> peer, or 'floor') stacked in our order, outermost first."""
    fn: Program = program
    for pattern in reversed(PATTERNS):
        peer = choice.get(pattern, "floor")
        if peer == "floor":
            fn = FLOORS[pattern](fn)
            continue
        dist, builder = PEERS[pattern][peer]
        built = build_peer(dist, lambda b=builder, f=fn: b(f))  # type: ignore[misc]
        if built is None:
            return None
        fn = built
    return fn


async def stack_group(batch: int, rounds: int, best: dict[str, str]) -> Group:
    """The full stack on a miss and on a hit: bare, floor (inline), ours, the best-of-breed peers and the
    all-in-one peers (pyresilience; hyx with aiocache)."""
    composites: dict[str, Program | None] = {
        "best-of-breed peers": peer_composite(best),
        "hyx + aiocache": peer_composite({p: "hyx" for p in PATTERNS[:-1]} | {"cache": "aiocache"}),
        "pyresilience": build_peer(
            "pyresilience",
            lambda: _pyresilience(parts=["timeout", "rate_limiter", "retry", "circuit_breaker", "bulkhead", "cache"])(
                program
            ),
        ),
    }
    variants = [Variant("bare", fresh(program), "await program(question=f'q{i}')")]
    for kind, runner in (("miss", fresh), ("hit", same)):
        builds: list[tuple[str, Program | None]] = [
            (f"stack/{kind} floor", floor_stack(program)),
            (f"stack/{kind} ours", our_stack(program)),
            (f"stack/{kind} {CACHE_FIRST}", our_stack_cache_first(program)),
        ]
        for label in composites:
            # a fresh composite per kind, so hits and misses don't share one cache
            built = composites[label] if kind == "miss" else None
            if kind == "hit":
                if label == "best-of-breed peers":
                    built = peer_composite(best)
                elif label == "hyx + aiocache":
                    built = peer_composite({p: "hyx" for p in PATTERNS[:-1]} | {"cache": "aiocache"})
                else:
                    built = build_peer(
                        "pyresilience",
                        lambda: _pyresilience(
                            parts=["timeout", "rate_limiter", "retry", "circuit_breaker", "bulkhead", "cache"]
                        )(program),
                    )
            builds.append((f"stack/{kind} {label}", built))
        for name, fn in builds:
            if fn is not None and await works(fn, name):
                variants.append(Variant(name, runner(fn)))
    return Group("stack", "Full stack, trivial program, ns per call", batch, rounds, variants)


# ----------------------------------------------------------------------------------- (3) retry failure path

FAILS = 3


async def failure_group(batch: int, rounds: int) -> tuple[Group, list[str]]:
    """Each retry implementation with a program failing its first ``FAILS`` attempts, and never failing."""
    builders: dict[str, tuple[str, Callable[[Program, int], Program]]] = {
        "floor": ("floor", lambda fn, attempts: floor_retry(fn, attempts)),
        "ours": ("ours", lambda fn, attempts: Pipeline(fn, Retry(attempts, base_delay=0, jitter="none", budget=None))),
        **RETRY_PEERS,
    }
    variants = [Variant("bare", fresh(program))]
    labels = []
    for label, (dist, builder) in builders.items():
        flaky = Flaky(lambda: ConnectionError("injected"))

        async def flaky_program(question: str, flaky: Flaky = flaky) -> str:
            # a real coroutine function: stamina, backoff and pyresilience inspect it to pick their async path
            return await flaky(question=question)

        fn = build_peer(dist, lambda b=builder, f=flaky_program: b(f, FAILS + 1))  # type: ignore[misc]
        if fn is None or not await works(fn, label):
            continue
        flaky.pending = FAILS
        try:
            ok = await fn(question="probe") == "probe"
        except Exception as error:
            SKIPPED.setdefault(label, f"did not retry: {type(error).__name__}: {error}")
            ok = False
        if not ok:
            continue
        labels.append(label)
        variants.append(Variant(f"{label} k=0", failing_calls(fn, flaky, 0)))
        variants.append(Variant(f"{label} k={FAILS}", failing_calls(fn, flaky, FAILS)))
    return Group(
        "failure", "Retry with zero backoff, program fails k attempts, ns per call", batch, rounds, variants
    ), labels


# ------------------------------------------------------------------------------------- (4) 10k concurrency


async def concurrent_round(make: Callable[[Program], Program], n: int, tag: str) -> float:
    """ns per task: ``n`` tasks through ``fn``, all in flight at once (the program waits on a gate), then released."""
    gate = asyncio.Event()

    async def gated(question: str) -> str:
        await gate.wait()
        return question

    target = make(gated)
    started = time.perf_counter_ns()
    tasks = [asyncio.ensure_future(target(question=f"{tag}-{i}")) for i in range(n)]
    await asyncio.sleep(0)
    gate.set()
    await asyncio.gather(*tasks)
    return (time.perf_counter_ns() - started) / n


def _gated_variants() -> dict[str, Callable[[Program], Program]]:
    return {"bare": lambda gated: gated, "floor": floor_stack, "ours": our_stack}


async def concurrency(n: int, rounds: int) -> dict[str, Any]:
    """Extra µs per task over bare tasks (paired per round, order rotated), and bytes per in-flight call."""
    makers = _gated_variants()
    names = list(makers)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up
        await concurrent_round(makers[name], min(n, 1000), f"warm-{name}")
    for round_ in range(rounds):
        for i in range(len(names)):
            name = names[(round_ + i) % len(names)]
            gc.collect()
            samples[name].append(await concurrent_round(makers[name], n, f"r{round_}-{name}"))
    bare = samples["bare"]
    result: dict[str, Any] = {"tasks": n, "rounds": rounds, "ns_per_task": {}, "extra_us": {}, "bytes_in_flight": {}}
    for name in names:
        extra = [(x - y) / 1000 for x, y in zip(samples[name], bare, strict=True)]
        result["ns_per_task"][name] = {"median": statistics.median(samples[name]), "min": min(samples[name])}
        result["extra_us"][name] = {"median": statistics.median(extra), "min": min(extra)}
    ratios = [(o - b) / (f - b) for o, f, b in zip(samples["ours"], samples["floor"], bare, strict=True) if f - b > 0]
    result["ours_over_floor_extra"] = statistics.median(ratios) if ratios else float("nan")
    for name in names:
        result["bytes_in_flight"][name] = await in_flight_bytes(makers[name], n)
    return result


async def in_flight_bytes(make: Callable[[Program], Program], n: int) -> float:
    """Traced bytes held per call while ``n`` calls wait in flight (tracemalloc; a separate, untimed pass)."""
    gate = asyncio.Event()

    async def gated(question: str) -> str:
        await gate.wait()
        return question

    target = make(gated)
    questions = [f"mem-{time.perf_counter_ns()}-{i}" for i in range(n)]
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        tasks = [asyncio.ensure_future(target(question=q)) for q in questions]
        for _ in range(3):
            await asyncio.sleep(0)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    gate.set()
    await asyncio.gather(*tasks)
    return held / n


# ------------------------------------------------------------------------ (5) limiter, fairness, single-flight


def limiter_figures(seconds: int, cap: float) -> dict[str, Any]:
    """``bench_limiter.py``'s window and fairness scenarios, side by side (real loop clock)."""
    try:
        import bench_limiter
    except ImportError as error:  # aiolimiter missing: the script needs it at import
        SKIPPED.setdefault("aiolimiter", f"{type(error).__name__}: {error}")
        return {}
    limiters = bench_limiter.LIMITERS
    windows = asyncio.run(
        bench_limiter.side_by_side([bench_limiter.saturate(m(False), seconds) for m in limiters.values()])
    )
    fair = asyncio.run(bench_limiter.side_by_side([bench_limiter.fairness(m(True), cap) for m in limiters.values()]))
    return {name: {"window": w, "fairness": f} for name, w, f in zip(limiters, windows, fair, strict=True)}


# ---------------------------------------------------------------------------------------- (6) chaos goodput


CHAOS = {
    "rate_limit": 0.15,
    "server_error": 0.10,
    "hang": 0.03,
    "retry_after": (0.5, 2.0),
    "latency": (0.05, 0.6),
}


async def chaos_batch(ask: Program, asked: list[str], lm: Any, concurrency_: int) -> dict[str, Any]:
    """``asked`` through ``ask``, ``concurrency_`` at a time, with ``lm`` in context: answers, failures, LM calls."""
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency_)
    latencies: list[float] = []
    failures: dict[str, int] = {}

    async def one(question: str) -> None:
        async with gate:
            began = loop.time()
            try:
                await ask(question=question)
            except Exception as error:
                failures[type(error).__name__] = failures.get(type(error).__name__, 0) + 1
            else:
                latencies.append(loop.time() - began)

    started = loop.time()
    with dspy.context(lm=lm):
        await asyncio.gather(*(one(q) for q in asked))
    wall = loop.time() - started
    ordered = sorted(latencies) or [0.0]
    return {
        "answered": len(latencies),
        "failed": sum(failures.values()),
        "failures": failures,
        "lm_calls": lm.requests,
        "virtual_wall_s": wall,
        "goodput_per_s": len(latencies) / wall if wall else 0.0,
        "p50_s": ordered[len(ordered) // 2],
        "p95_s": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
    }


async def chaos_run(questions: int, concurrency_: int, patience: float) -> dict[str, Any]:
    """The same questions through our pipeline (LM ``num_retries=0``) and through the bare program with DSPy's
    default ``num_retries=3``, on one fault profile (same seed). Runs on looptime's virtual clock."""
    from resilient_dspy.cli.demo import QUESTIONS, _questions
    from resilient_dspy.testing import FaultInjectingLM, FaultProfile

    profile = FaultProfile(**CHAOS)  # type: ignore[arg-type]
    asked = _questions(questions)
    predict = dspy.ChainOfThought("question -> answer")
    pipeline = Pipeline(
        predict,
        Timeout(patience),
        Retry(5, base_delay=0.2, max_delay=2.0, max_retry_after=4.0, budget=None),
        Timeout(2.0),
    )

    async def bare(question: str) -> Any:
        return await asyncio.wait_for(predict.acall(question=question), patience)

    results: dict[str, Any] = {}
    for label, ask, retries in (("ours", pipeline, 0), ("bare (DSPy num_retries=3)", bare, 3)):
        lm = FaultInjectingLM("fault/chaos", profile=profile, seed=11, answers=QUESTIONS, num_retries=retries)
        results[label] = await chaos_batch(ask, asked, lm, concurrency_)
    return results


def chaos(questions: int, concurrency_: int, patience: float) -> dict[str, Any]:
    try:
        import looptime
    except ImportError as error:
        SKIPPED.setdefault("looptime", f"{type(error).__name__}: {error} (chaos run skipped)")
        return {}
    loop = looptime.new_event_loop()
    try:
        started = time.perf_counter()
        result = loop.run_until_complete(chaos_run(questions, concurrency_, patience))
        result["real_s"] = time.perf_counter() - started
        return result
    finally:
        loop.close()


# ------------------------------------------------------------------------------------------------- analysis


def overheads(group: Group) -> dict[str, list[float]]:
    """Per round, each variant's ns per call minus the bare await's (paired)."""
    bare = group.variants[0].samples
    return {v.name: [x - y for x, y in zip(v.samples, bare, strict=True)] for v in group.variants}


def paired_ratio(over: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of overhead(a) / overhead(b), rounds where b's overhead is not positive left out."""
    ratios = [x / y for x, y in zip(over[a], over[b], strict=True) if y > 0]
    return statistics.median(ratios) if ratios else float("nan")


def med(values: list[float]) -> float:
    return statistics.median(values)


def layer_table(group: Group, rows: dict[str, list[str]]) -> dict[str, Any]:
    """Per pattern: overhead of floor, ours (and ours minus a bare Pipeline), each peer; best peer; ratios."""
    over = overheads(group)
    pipe = over["pipeline"]
    table: dict[str, Any] = {"pipeline_over_bare_ns": med(pipe)}
    for kind, names in rows.items():
        floor, ours = f"{kind} floor", f"{kind} ours"
        peers = [n for n in names if n not in (floor, ours)]
        entry: dict[str, Any] = {
            "variants": {
                n.split(" ", 1)[1]: {
                    "overhead_ns": med(over[n]),
                    "min_overhead_ns": min(over[n]),
                    "median_ns": med(group.get(n).samples),
                }
                for n in names
            },
            "ours_layer_only_ns": med([x - y for x, y in zip(over[ours], pipe, strict=True)]) if ours in over else None,
        }
        if ours in over and floor in over:
            entry["ours_over_floor"] = paired_ratio(over, ours, floor)
        if peers:
            best = min(peers, key=lambda n: med(over[n]))
            entry["best_peer"] = best.split(" ", 1)[1]
            if ours in over:
                entry["ours_over_best_peer"] = paired_ratio(over, ours, best)
                entry["ours_layer_only_over_best_peer"] = statistics.median(
                    (x - p) / y for x, p, y in zip(over[ours], pipe, over[best], strict=True) if y > 0
                )
        table[kind] = entry
    return table


def best_of_breed(table: dict[str, Any]) -> dict[str, str]:
    """The fastest peer per pattern (cache by its miss row); 'floor' where no peer ran."""
    choice = {}
    for pattern in PATTERNS:
        kind = "cache/miss" if pattern == "cache" else pattern
        choice[pattern] = table.get(kind, {}).get("best_peer", "floor")
    return choice


def stack_table(group: Group) -> dict[str, Any]:
    over = overheads(group)
    table: dict[str, Any] = {}
    for kind in ("miss", "hit"):
        prefix = f"stack/{kind} "
        names = [v.name for v in group.variants if v.name.startswith(prefix)]
        entry: dict[str, Any] = {
            "variants": {
                n[len(prefix) :]: {
                    "overhead_ns": med(over[n]),
                    "min_overhead_ns": min(over[n]),
                    "median_ns": med(group.get(n).samples),
                }
                for n in names
            }
        }
        ours, floor, first = prefix + "ours", prefix + "floor", prefix + CACHE_FIRST
        peers = [n for n in names if n not in (ours, floor, first)]
        if ours in over:
            entry["ours_over_floor"] = paired_ratio(over, ours, floor)
            if peers:
                best = min(peers, key=lambda n: med(over[n]))
                entry["best_peer"] = best[len(prefix) :]
                entry["ours_over_best_peer"] = paired_ratio(over, ours, best)
                if first in over:
                    entry["cache_first_over_best_peer"] = paired_ratio(over, first, best)
        table[kind] = entry
    return table


def failure_table(group: Group, labels: list[str]) -> dict[str, Any]:
    per: dict[str, list[float]] = {}
    for label in labels:
        zero, failed = group.get(f"{label} k=0").samples, group.get(f"{label} k={FAILS}").samples
        per[label] = [(x - y) / FAILS for x, y in zip(failed, zero, strict=True)]
    table: dict[str, Any] = {"per_failed_attempt_ns": {k: med(v) for k, v in per.items()}}
    table["min_per_failed_attempt_ns"] = {k: min(v) for k, v in per.items()}
    peers = [k for k in per if k not in ("ours", "floor")]
    if "ours" in per and peers:
        best = min(peers, key=lambda k: med(per[k]))
        table["best_peer"] = best
        table["ours_over_best_peer"] = statistics.median(
            x / y for x, y in zip(per["ours"], per[best], strict=True) if y > 0
        )
    if "ours" in per and "floor" in per:
        table["ours_over_floor"] = statistics.median(
            x / y for x, y in zip(per["ours"], per["floor"], strict=True) if y > 0
        )
    return table


def targets(results: dict[str, Any]) -> list[tuple[str, bool | None, str]]:
    """(target, holds?, the numbers); None = not measured in this run."""
    out: list[tuple[str, bool | None, str]] = []
    stack = results.get("stack", {})
    miss = stack.get("miss", {})
    if "ours_over_floor" in miss:
        r = miss["ours_over_floor"]
        out.append(("full stack (miss) ≤ 1.3x the floor", r <= 1.3, f"{r:.2f}x"))
    if "ours_over_best_peer" in miss:
        r = miss["ours_over_best_peer"]
        out.append(("full stack (miss) ≤ 0.5x the best peer composite", r <= 0.5, f"{r:.2f}x ({miss['best_peer']})"))
    hit = stack.get("hit", {})
    if "ours_over_floor" in hit:
        r = hit["ours_over_floor"]
        out.append(("full stack (hit) ≤ 1.3x the floor", r <= 1.3, f"{r:.2f}x"))
    if "ours_over_best_peer" in hit:
        r = hit["ours_over_best_peer"]
        out.append(("full stack (hit) ≤ 0.5x the best peer composite", r <= 0.5, f"{r:.2f}x ({hit['best_peer']})"))
    if "cache_first_over_best_peer" in hit:
        r = hit["cache_first_over_best_peer"]
        label = "full stack (hit), ours with the Cache outermost, ≤ 0.5x the best peer composite"
        out.append((label, r <= 0.5, f"{r:.2f}x ({hit['best_peer']})"))
    for kind, entry in results.get("layers", {}).items():
        if isinstance(entry, dict) and "ours_over_best_peer" in entry:
            r = entry["ours_over_best_peer"]
            alone = entry["ours_layer_only_over_best_peer"]
            out.append(
                (
                    f"{kind}: ours no slower than the best peer",
                    r <= 1.0,
                    f"{r:.2f}x {entry['best_peer']} (layer alone, Pipeline's own cost taken out: {alone:.2f}x)",
                )
            )
    failure = results.get("failure", {})
    if "ours_over_best_peer" in failure:
        r = failure["ours_over_best_peer"]
        out.append(("retry failure path no slower than the best peer", r <= 1.0, f"{r:.2f}x {failure['best_peer']}"))
    conc = results.get("concurrency", {})
    if "ours_over_floor_extra" in conc:
        r = conc["ours_over_floor_extra"]
        out.append((f"{conc['tasks']:,} concurrent: extra cost ≤ 1.3x the floor", r <= 1.3, f"{r:.2f}x"))
    limiter = results.get("limiter", {}).get("ours (exact)")
    if limiter:
        w, f = limiter["window"], limiter["fairness"]
        ok = w["max_in_any_1s_window"] <= 100 and w["utilisation"] >= 0.98
        out.append(
            (
                "limiter never over 100/s at ≥ 98 % utilisation",
                ok,
                f"max {w['max_in_any_1s_window']} in any 1 s, utilisation {w['utilisation']:.1%}",
            )
        )
        waited = f["waited_s"]
        bound = f"; strict-FIFO bound {f['fifo_bound_s']:.2f} s ({f['waiting_ahead']} waiting ahead)"
        out.append(("50-unit request admitted within 0.6 s", waited <= 0.6, f"{waited:.2f} s{bound}"))
    flight = results.get("single_flight", {}).get("resilient_dspy Cache")
    if flight:
        out.append(
            (
                "single-flight: 10 identical misses make 1 call",
                flight["requests_max"] == 1,
                f"max {flight['requests_max']}",
            )
        )
    return out


# ------------------------------------------------------------------------------------------------ rendering


def us(ns: float | None) -> str:
    return "—" if ns is None else f"{ns / 1000:,.2f}"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for dist in ("resilient-dspy", "dspy", *PEER_PACKAGES, "looptime"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "versions": versions,
    }


def render(results: dict[str, Any]) -> list[str]:
    """The report as markdown lines (printed to the terminal and, with ``--write-docs``, to a file)."""
    meta = results["meta"]
    lines = [
        f"Run {meta['date']} · `{meta['command']}` · {meta['seconds']} s",
        "",
        f"Machine: {meta['machine']['cpu']}, {meta['machine']['cores']} cores (shared and noisy: read the ratios, "
        f"which are paired per round, more than the absolute µs) · Python {meta['machine']['python']} · "
        f"{meta['machine']['platform']}",
        "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["machine"]["versions"].items()),
        "",
    ]
    if SKIPPED or results.get("skipped"):
        lines += ["Skipped: " + "; ".join(f"{k} ({v})" for k, v in results["skipped"].items()), ""]
    lines += ["## Targets", "", "| target | holds | measured |", "|---|---|---|"]
    for name, ok, numbers in targets(results):
        lines.append(f"| {name} | {'yes' if ok else 'no' if ok is not None else '—'} | {numbers} |")
    layers = results.get("layers")
    if layers:
        lines += [
            "",
            "## Success path per layer",
            "",
            f"Overhead over a bare `await` in µs per call (median over rounds; min in brackets). `Pipeline(program)` "
            f"alone costs {us(layers['pipeline_over_bare_ns'])} µs and is included in every *ours* figure; "
            "'layer alone' takes it out. Ratios are paired per round.",
            "",
            "| pattern | floor | ours | ours, layer alone | peers | best peer | ours / best peer | ours / floor |",
            "|---|---:|---:|---:|---|---|---:|---:|",
        ]
        for kind, entry in layers.items():
            if not isinstance(entry, dict):
                continue
            v = entry["variants"]
            peers = ", ".join(f"{n} {us(r['overhead_ns'])}" for n, r in v.items() if n not in ("floor", "ours")) or "—"
            floor = f"{us(v['floor']['overhead_ns'])} ({us(v['floor']['min_overhead_ns'])})" if "floor" in v else "—"
            ours = f"{us(v['ours']['overhead_ns'])} ({us(v['ours']['min_overhead_ns'])})" if "ours" in v else "—"
            lines.append(
                f"| {kind} | {floor} | {ours} | {us(entry['ours_layer_only_ns'])} | {peers} | "
                f"{entry.get('best_peer', '—')} | {entry.get('ours_over_best_peer', float('nan')):.2f}x | "
                f"{entry.get('ours_over_floor', float('nan')):.2f}x |"
            )
    stack = results.get("stack")
    if stack:
        lines += [
            "",
            "## Full stack: timeout ▶ limiter ▶ retry ▶ breaker ▶ bulkhead ▶ cache",
            "",
            "Overhead over a bare `await`, µs per call, median (min). The floor is all six inline in one coroutine; "
            f"best-of-breed = the fastest peer per pattern in this run ({results.get('best_of_breed')}). "
            f"*{CACHE_FIRST}* is the same pipeline with the Cache outermost, the order pyresilience applies (it "
            "looks up its cache before any other pattern), so a hit skips every guard.",
            "",
            "| cache | variant | overhead µs | ours / this |",
            "|---|---|---:|---:|",
        ]
        for kind, entry in stack.items():
            for name, row in entry["variants"].items():
                ratio = ""
                if name == "floor" and "ours_over_floor" in entry:
                    ratio = f"{entry['ours_over_floor']:.2f}x"
                elif name == entry.get("best_peer"):
                    ratio = f"{entry['ours_over_best_peer']:.2f}x (best peer)"
                    if "cache_first_over_best_peer" in entry:
                        ratio += f"; cache first: {entry['cache_first_over_best_peer']:.2f}x"
                lines.append(f"| {kind} | {name} | {us(row['overhead_ns'])} ({us(row['min_overhead_ns'])}) | {ratio} |")
    failure = results.get("failure")
    if failure:
        lines += [
            "",
            f"## Retry: cost per failed attempt (zero backoff, program fails {FAILS} times)",
            "",
            "`(t(k=3) - t(k=0)) / 3`, paired per round; includes the one loop turn that `sleep(0)` costs. Ours runs "
            "with `budget=None` (the retry budget would refuse 3 retries per call).",
            "",
            "| retry | µs per failed attempt, median (min) |",
            "|---|---:|",
        ]
        for name, ns in failure["per_failed_attempt_ns"].items():
            lines.append(f"| {name} | {us(ns)} ({us(failure['min_per_failed_attempt_ns'][name])}) |")
        if "ours_over_best_peer" in failure:
            lines.append(f"| ours / best peer ({failure['best_peer']}) | {failure['ours_over_best_peer']:.2f}x |")
    conc = results.get("concurrency")
    if conc:
        lines += [
            "",
            f"## {conc['tasks']:,} concurrent calls through the full stack (cache misses)",
            "",
            "| variant | µs per task | extra µs per task over bare tasks | traced bytes per in-flight call |",
            "|---|---:|---:|---:|",
        ]
        for name in conc["ns_per_task"]:
            lines.append(
                f"| {name} | {us(conc['ns_per_task'][name]['median'])} | {conc['extra_us'][name]['median']:.2f} | "
                f"{conc['bytes_in_flight'][name]:,.0f} |"
            )
        lines.append(f"| ours / floor (extra) | | {conc['ours_over_floor_extra']:.2f}x | |")
    limiter = results.get("limiter")
    if limiter:
        lines += [
            "",
            "## Rate limiter at 100/s (real clock; `bench_limiter.py`'s scenarios)",
            "",
            "The FIFO bound is (1-unit requests waiting when the 50-unit one arrives + 50) / 100 per second: the",
            "earliest a first-come first-served limiter that never exceeds the limit can admit it (see",
            "`docs/performance.md`).",
            "",
            "| limiter | max in any 1 s | utilisation | 50-unit request among 1-unit flood | FIFO bound |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in limiter.items():
            w, f = row["window"], row["fairness"]
            wait = f"> {f['cap_s']:g} s (starved)" if f["starved_until_flood_stopped"] else f"{f['waited_s']:.2f} s"
            bound = f"{f['fifo_bound_s']:.2f} s"
            lines.append(f"| {name} | {w['max_in_any_1s_window']} | {w['utilisation']:.1%} | {wait} | {bound} |")
    flight = results.get("single_flight")
    if flight:
        lines += [
            "",
            f"## Single-flight: {bench_cache.CONCURRENT} identical concurrent misses (`bench_cache.py`)",
            "",
            "| variant | LM requests min / median / max |",
            "|---|---:|",
        ]
        for name, row in flight.items():
            lines.append(f"| {name} | {row['requests_min']} / {row['requests_median']:g} / {row['requests_max']} |")
    ch = results.get("chaos")
    if ch:
        lines += [
            "",
            "## Goodput under chaos (looptime virtual time)",
            "",
            f"`dspy.ChainOfThought` on `FaultInjectingLM(profile=FaultProfile({CHAOS}))`, seed 11, "
            f"{results['chaos_questions']} questions, {results['chaos_concurrency']} at a time. Ours: "
            "`Timeout(total) ▶ Retry(5, Retry-After capped at 4 s) ▶ Timeout(2 s)`, LM `num_retries=0`; bare: "
            "DSPy's default `num_retries=3`, cut off at the same total patience. Times are virtual seconds "
            f"({ch['real_s']:.1f} s real).",
            "",
            "| variant | answered | failed | LM calls | virtual wall s | goodput /s | p50 s | p95 s |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, row in ch.items():
            if not isinstance(row, dict):
                continue
            lines.append(
                f"| {name} | {row['answered']} | {row['failed']} {row['failures'] or ''} | {row['lm_calls']} | "
                f"{row['virtual_wall_s']:.1f} | {row['goodput_per_s']:.2f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} |"
            )
    return lines


DOC_HEADER = """# Benchmarks: resilient_dspy next to its Python peers

Generated by `python benchmarks/bench_peers.py --write-docs docs/benchmarks.md`; do not edit by hand, run it
again. What each figure means and how it is measured: the docstring of `benchmarks/bench_peers.py` and
`benchmarks/README.md`. Why each target holds or not, with the profile behind it: [performance](performance.md).
The *floor* is the least code that does each pattern correctly (try/except retry loop, counter breaker,
`asyncio.Semaphore`, deque sliding-window limiter, dict cache): the physical target. All figures are from one
process run; timed variants are interleaved round-robin with the order rotated each round.
"""


# ----------------------------------------------------------------------------------------------------- main


SIZES = {
    # name: (layers batch, rounds), (failure batch, rounds), (tasks, rounds), limiter s, fairness cap, flights, chaos
    "smoke": ((20, 2), (10, 2), (300, 2), 2, 2.0, 1, 8),
    "quick": ((300, 12), (200, 10), (10_000, 3), 2, 3.0, 4, 60),
    "full": ((500, 40), (300, 30), (10_000, 7), 5, 8.0, 10, 200),
}


async def timed_sections(size: tuple[Any, ...]) -> dict[str, Any]:
    (batch, rounds), (fbatch, frounds), (tasks, trounds) = size[:3]
    results: dict[str, Any] = {}
    group, rows = await layer_group(batch, rounds)
    await measure(group)
    results["layers"] = layer_table(group, rows)
    results["layers_raw"] = summarize(group)
    best = best_of_breed(results["layers"])
    results["best_of_breed"] = best
    print(f"  layers done ({len(group.variants)} variants); best of breed {best}", flush=True)
    group = await stack_group(batch, rounds, best)
    await measure(group)
    results["stack"] = stack_table(group)
    results["stack_raw"] = summarize(group)
    print("  full stack done", flush=True)
    group, labels = await failure_group(fbatch, frounds)
    await measure(group)
    results["failure"] = failure_table(group, labels)
    print("  retry failure path done", flush=True)
    results["concurrency"] = await concurrency(tasks, trounds)
    print("  concurrency done", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds (~1 min)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs (~15 s)")
    parser.add_argument("--json", type=Path, help="write every figure and raw sample to this file")
    parser.add_argument("--write-docs", type=Path, help="write the markdown report to this file")
    args = parser.parse_args()
    size = SIZES["smoke" if args.smoke else "quick" if args.quick else "full"]
    started = time.perf_counter()
    meta: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": " ".join(["python", *sys.argv]),
        "machine": machine(),
        "size": "smoke" if args.smoke else "quick" if args.quick else "full",
    }
    print(
        f"bench_peers ({meta['size']}): Python {meta['machine']['python']}, {meta['machine']['cores']} cores",
        flush=True,
    )
    results = asyncio.run(timed_sections(size))
    results["limiter"] = limiter_figures(size[3], size[4])
    print("  limiter done", flush=True)
    results["single_flight"] = asyncio.run(bench_cache.single_flight(size[5]))
    print("  single-flight done", flush=True)
    results["chaos_questions"], results["chaos_concurrency"] = size[6], 10
    results["chaos"] = chaos(size[6], 10, 30.0)
    meta["seconds"] = round(time.perf_counter() - started, 1)
    results["skipped"] = dict(SKIPPED)
    results["meta"] = meta
    lines = render(results)
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
        print(f"Wrote {args.json}")
    if args.write_docs:
        previous = args.write_docs.read_text() if args.write_docs.exists() else ""
        marks = ("<!-- bench_serve.py", "<!-- bench_adaptive.py", "<!-- bench_batch.py")
        kept = [at for at in (previous.find(mark) for mark in marks) if at >= 0]
        batches = previous[min(kept) :] if kept else ""  # the sections bench_serve, bench_adaptive, bench_batch write
        args.write_docs.write_text(DOC_HEADER + "\n" + "\n".join(lines) + "\n" + ("\n" + batches if batches else ""))
        print(f"Wrote {args.write_docs}")


if __name__ == "__main__":
    main()
