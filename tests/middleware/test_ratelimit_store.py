"""RateLimiter on a real redis-server (``store=RedisStore``): the exactness properties on the server's meter (short
real periods, bounded counts), several limits at once, GCRA on the server, reconciliation, FIFO, the turn that keeps
a large request from starving across processes, ``local`` and ``reject`` while the store is down (a real server
stopped and restarted mid-run), describe/health, and 4 processes sharing one quota checked against the chaos
server's own journal.

Real time, not looptime (the server's clock cannot be driven): admissions are stamped by the program a few hundred µs
after the server decided, so windows are counted ``GUARD`` short (as bench_limiter.py does).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Cache, Pipeline, RateLimitedError
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter, RateLimitRejected, RateLimitWaited
from resilient_dspy.store import RedisStore, StoreRecovered, StoreUnavailable, StoreUnavailableError
from resilient_dspy.testing.chaos_server import ChaosServer, Quota
from tests.conftest import other_tasks
from tests.redis_server import free_port, redis_server

from .test_ratelimit import by_tokens_input, report_usage

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]

GUARD = 0.02  # seconds taken off each window: the gap between the server's decision and the program's stamp
ROOT = Path(__file__).resolve().parents[2]


def now() -> float:
    return asyncio.get_running_loop().time()


class Stamps:
    """An async program that records when each call started and reports ``actual`` tokens as its LM usage."""

    def __init__(self) -> None:
        self.admitted: list[tuple[float, str]] = []

    @property
    def names(self) -> list[str]:
        return [name for _, name in self.admitted]

    def time_of(self, name: str) -> float:
        return next(t for t, n in self.admitted if n == name)

    async def __call__(self, question: str, tokens: int = 1, actual: int | None = None, latency: float = 0.0) -> str:
        self.admitted.append((now(), question))
        if latency:
            await asyncio.sleep(latency)
        if actual is not None:
            report_usage(actual)
        return question


def most_in_a_window(admissions: list[tuple[float, int]], per: float) -> int:
    """The largest weight admitted in any [s, s + per - GUARD) starting at an admission."""
    times = sorted(admissions)
    return max(sum(w for t, w in times if start <= t < start + per - GUARD) for start, _ in times)


def fresh(url: str, **options: Any) -> RedisStore:
    return RedisStore(url, prefix=f"rl-{uuid.uuid4().hex[:12]}", **options)


# ------------------------------------------------------------------------------------------------ exactness


@settings(max_examples=6, deadline=None)
@given(
    amount=st.integers(2, 6),
    tokens=st.none() | st.integers(20, 60),
    arrivals=st.lists(
        st.tuples(st.sampled_from([0.0, 0.0, 0.03, 0.1]), st.integers(1, 20), st.sampled_from([0, 0, 50])),
        min_size=4,
        max_size=16,
    ),
)
def test_property_no_window_on_the_server_exceeds_any_limit(
    redis_url: str, amount: int, tokens: int | None, arrivals: list[tuple[float, int, int]]
) -> None:
    """Any arrivals, weights and refunds on requests (and tokens) per 0.3 s: every window holds at most the limit
    (tokens at their reconciled weight), admissions keep the arrival order, and the run ends within the time an
    exact limiter needs (it is work-conserving)."""
    per = 0.3
    limits = [Limit.requests(amount, per)] + ([Limit.tokens(tokens, per)] if tokens else [])
    calls = [(gap, min(weight, tokens or 20), refund) for gap, weight, refund in arrivals]

    async def scenario() -> None:
        store = fresh(redis_url)
        program = Stamps()
        pipeline = Pipeline(program, RateLimiter(*limits, estimate_tokens=by_tokens_input, store=store))
        tasks = []
        started = now()
        for index, (gap, weight, refund) in enumerate(calls):
            await asyncio.sleep(gap)
            actual = weight - weight * refund // 100
            tasks.append(asyncio.create_task(pipeline(question=str(index), tokens=weight, actual=actual)))
        assert await asyncio.gather(*tasks) == [str(i) for i in range(len(calls))]
        await store.aclose()
        assert program.names == [str(i) for i in range(len(calls))]
        times = [t for t, _ in program.admitted]
        assert most_in_a_window([(t, 1) for t in times], per) <= amount
        if tokens:
            weights = [w - w * r // 100 for _, w, r in calls]
            assert most_in_a_window(list(zip(times, weights, strict=True)), per) <= tokens
        windows = len(calls) // amount + (sum(w for _, w, _ in calls) // tokens if tokens else 0) + 1
        assert now() - started <= sum(g for g, _, _ in calls) + windows * per + 1.0

    asyncio.run(scenario())


async def test_exactly_amount_in_the_first_window_then_the_next(redis_store: RedisStore) -> None:
    """10 per 0.5 s, 25 at once: 10 at once, 10 when they leave the window, 5 after that; none early."""
    program = Stamps()
    pipeline = Pipeline(program, RateLimiter(requests=10, per=0.5, store=redis_store))
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(25)))
    times = [t - start for t, _ in program.admitted]
    assert sum(1 for t in times if t < 0.5) == 10
    assert sum(1 for t in times if t < 1.0) == 20
    assert most_in_a_window([(t, 1) for t in times], 0.5) == 10
    assert times[-1] < 1.5


async def test_two_limiters_with_the_same_name_on_one_prefix_share_the_limit(redis_url: str) -> None:
    """Two layers standing for two processes (two connection pools): 4 per 0.5 s between them; another name is apart."""
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    stores = [RedisStore(redis_url, prefix=prefix) for _ in range(3)]
    program = Stamps()
    a, b = (Pipeline(program, RateLimiter(requests=4, per=0.5, store=s, name="quota")) for s in stores[:2])
    other = Pipeline(Stamps(), RateLimiter(requests=4, per=0.5, store=stores[2], name="other"))
    start = now()
    await asyncio.gather(*(p(question=f"{n}{i}") for i in range(4) for n, p in (("a", a), ("b", b))))
    apart = now()
    await asyncio.gather(*(other(question=str(i)) for i in range(4)))
    assert now() - apart < 0.3  # the other name had room at once
    times = [t - start for t, _ in program.admitted]
    assert sum(1 for t in times if t < 0.5) == 4 and max(times) >= 0.5 - GUARD
    for store in stores:
        await store.aclose()


async def test_several_limits_are_checked_and_charged_together(redis_store: RedisStore) -> None:
    """3 requests and 100 tokens per 0.5 s: 60-token calls go one a window (tokens bind); 10-token calls three a
    window (requests bind); a refused call charges nothing, so the small calls are not delayed by it."""
    program = Stamps()
    limiter = RateLimiter(Limit.requests(3, 0.5), Limit.tokens(100, 0.5), estimate_tokens=by_tokens_input)
    pipeline = Pipeline(
        program, RateLimiter(*limiter.options.limits, estimate_tokens=by_tokens_input, store=redis_store)
    )
    start = now()
    await asyncio.gather(*(pipeline(question=f"big{i}", tokens=60) for i in range(3)))
    big = [t - start for t, _ in program.admitted]
    assert big[0] < 0.3 and 0.5 - GUARD <= big[1] < 0.8 and 1.0 - GUARD <= big[2] < 1.3
    await asyncio.sleep(0.5)
    program.admitted.clear()
    start = now()
    await asyncio.gather(*(pipeline(question=f"small{i}", tokens=10) for i in range(6)))
    small = [t - start for t, _ in program.admitted]
    assert sum(1 for t in small if t < 0.5 - GUARD) == 3 and max(small) < 0.8


async def test_a_bucket_limit_is_a_gcra_on_the_server(redis_store: RedisStore) -> None:
    """4 per 0.8 s with a burst of 3: 3 at once, then one every 0.2 s, never early."""
    program = Stamps()
    pipeline = Pipeline(program, RateLimiter(Limit.requests(4, 0.8, burst=3), store=redis_store))
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(6)))
    times = [t - start for t, _ in program.admitted]
    assert max(times[:3]) < 0.15
    for index, expected in ((3, 0.2), (4, 0.4), (5, 0.6)):
        assert expected - GUARD <= times[index] < expected + 0.15


# ------------------------------------------------------------------------------------------- reconciliation


async def test_a_refund_on_the_server_lets_the_next_call_in_early(redis_store: RedisStore) -> None:
    """100 tokens per 1 s: an 80-token estimate that used 10 leaves room for another 80 at once."""
    program = Stamps()
    limiter = RateLimiter(Limit.tokens(100, 1.0), estimate_tokens=by_tokens_input, store=redis_store)
    pipeline = Pipeline(program, limiter)
    start = now()
    await pipeline(question="a", tokens=80, actual=10)
    await pipeline(question="b", tokens=80, actual=80)
    assert program.time_of("b") - start < 0.3


async def test_an_excess_on_the_server_delays_the_next_call(redis_store: RedisStore) -> None:
    """100 tokens per 0.5 s: a 10-token estimate that used 90 leaves no room for 20 until it leaves the window."""
    events: list[Event] = []
    program = Stamps()
    limiter = RateLimiter(Limit.tokens(100, 0.5), estimate_tokens=by_tokens_input, store=redis_store)
    pipeline = Pipeline(program, limiter, listeners=[events.append])
    start = now()
    await pipeline(question="a", tokens=10, actual=90)
    await pipeline(question="b", tokens=20, actual=20)
    assert program.time_of("b") - start >= 0.5 - GUARD
    assert [type(e).__name__ for e in events].count("RateLimitReconciled") == 2


# ------------------------------------------------------------------------------------------------- fairness


async def test_calls_of_one_process_are_admitted_in_arrival_order(redis_store: RedisStore) -> None:
    program = Stamps()
    pipeline = Pipeline(program, RateLimiter(Limit.tokens(50, 0.3), estimate_tokens=by_tokens_input, store=redis_store))
    weights = [5, 40, 1, 30, 20, 1, 45, 2]
    await asyncio.gather(*(pipeline(question=str(i), tokens=w) for i, w in enumerate(weights)))
    assert program.names == [str(i) for i in range(len(weights))]


async def test_a_large_request_of_one_process_is_not_starved_by_small_ones_of_another(redis_url: str) -> None:
    """Process A floods 100-tokens-per-0.5-s with 5-token calls; process B's 90-token call arrives into the flood.
    It holds the turn: A's calls go only while they do not delay it, and it is admitted within about a window."""
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    store_a, store_b = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)
    flood, large = Stamps(), Stamps()

    def limiter(store: RedisStore) -> RateLimiter:
        return RateLimiter(Limit.tokens(100, 0.5), estimate_tokens=by_tokens_input, store=store, name="q")

    a, b = Pipeline(flood, limiter(store_a)), Pipeline(large, limiter(store_b))
    stop = now() + 2.5

    async def flooder(index: int) -> None:
        while now() < stop:
            await a(question=f"small{index}", tokens=5)

    flooders = [asyncio.create_task(flooder(i)) for i in range(30)]
    await asyncio.sleep(0.4)
    arrived = now()
    await b(question="large", tokens=90)
    waited = large.time_of("large") - arrived
    await asyncio.gather(*flooders)
    assert waited < 1.2  # the flood's admissions leave the window within 0.5 s; without the turn: never
    after = [t for t, _ in flood.admitted if t >= large.time_of("large")]
    assert after  # the flood went on afterwards
    for store in (store_a, store_b):
        await store.aclose()


async def test_a_cancelled_head_hands_back_its_turn(redis_url: str) -> None:
    """B's 90-token head holds the turn, then is cancelled: A's small call goes as soon as it fits, not after the
    turn's lease; no task is left behind."""
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    store_a, store_b = RedisStore(redis_url, prefix=prefix), RedisStore(redis_url, prefix=prefix)

    def limiter(store: RedisStore) -> RateLimiter:
        return RateLimiter(Limit.tokens(100, 0.6), estimate_tokens=by_tokens_input, store=store, name="q")

    program = Stamps()
    a, b = Pipeline(program, limiter(store_a)), Pipeline(program, limiter(store_b))
    await a(question="fill", tokens=50)
    head = asyncio.create_task(b(question="large", tokens=90))
    await asyncio.sleep(0.15)
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    start = now()
    await a(question="small", tokens=40)
    assert program.time_of("small") - start < 0.8  # the turn was handed back (its lease would run past 1.6 s)
    assert not other_tasks()
    for store in (store_a, store_b):
        await store.aclose()


# ------------------------------------------------------------------------------------------ when Redis fails


async def test_reject_mode_refuses_with_the_stores_retry_interval_while_it_is_down() -> None:
    events: list[Event] = []
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, retry_interval=0.7)
    limiter = RateLimiter(requests=5, store=store, on_store_failure="reject")
    pipeline = Pipeline(Stamps(), limiter, listeners=[events.append])
    for _ in range(3):
        with pytest.raises(RateLimitedError) as caught:
            await pipeline(question="x")
        assert caught.value.retry_after == 0.7
    rejected = [e for e in events if isinstance(e, RateLimitRejected)]
    assert [e.reason for e in rejected] == ["store"] * 3
    assert [type(e) for e in events].count(StoreUnavailable) == 1
    assert limiter.health().status == "down"
    await store.aclose()


async def test_local_mode_serves_on_the_process_limit_while_the_store_is_down() -> None:
    events: list[Event] = []
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, retry_interval=5.0)
    program = Stamps()
    limiter = RateLimiter(requests=3, per=0.4, store=store)
    pipeline = Pipeline(program, limiter, listeners=[events.append])
    start = now()
    await asyncio.gather(*(pipeline(question=str(i)) for i in range(6)))
    times = [t - start for t, _ in program.admitted]
    assert most_in_a_window([(t, 1) for t in times], 0.4) == 3 and times[-1] >= 0.4 - GUARD
    assert [type(e) for e in events].count(StoreUnavailable) == 1
    health = limiter.health()
    assert health.status == "degraded" and health.details["store_ok"] is False
    await store.aclose()


async def test_a_server_stopped_and_restarted_mid_run_loses_no_call_and_is_shared_again() -> None:
    """Calls loop through a stop and a restart of the real server: all return, StoreUnavailable and StoreRecovered
    once each, health degraded then ok; after the restart a second process's limiter is held by the shared limit."""
    port = free_port()
    events: list[Event] = []
    done: list[str] = []
    program = Stamps()
    with redis_server(port) as url:
        store = RedisStore(url, prefix="restart", timeout=0.3, retry_interval=0.2)
        limiter = RateLimiter(requests=20, per=0.2, store=store, name="q")
        pipeline = Pipeline(program, limiter, listeners=[events.append])

        async def loop(index: int) -> None:
            for step in range(1000):
                done.append(await pipeline(question=f"{index}-{step}"))
                if stopping.is_set() and restarted.is_set():
                    return

        stopping, restarted = asyncio.Event(), asyncio.Event()
        loops = [asyncio.create_task(loop(i)) for i in range(4)]
        await asyncio.sleep(0.3)
        assert limiter.health().details["store_ok"] is True
    stopping.set()  # the server is gone
    await asyncio.sleep(0.6)
    health = limiter.health()
    assert health.status == "degraded" and health.details["store_ok"] is False
    during = len(done)
    with redis_server(port) as url:
        await asyncio.sleep(0.6)
        assert len(done) > during  # calls went on through the outage and after it
        assert limiter.health().details["store_ok"] is True
        restarted.set()
        await asyncio.wait_for(asyncio.gather(*loops), 10)
        assert limiter.health().status == "ok"
        kinds = [type(e) for e in events]
        assert kinds.count(StoreUnavailable) == 1 and kinds.count(StoreRecovered) == 1
        await asyncio.gather(*(pipeline(question=f"after{i}") for i in range(5)))
        window = "{" + store.key("ratelimit", "q", "") + "}:0"
        assert await store.client.zcard(window) >= 5  # the admissions are on the restarted server again
        await store.aclose()


# ------------------------------------------------------------------------------------ counted from the answer


class Steps:
    """A store that counts the steps it runs by operation and fails the next ``fail[operation]`` of them."""

    def __init__(self, inner: RedisStore, fail: dict[str, int] | None = None) -> None:
        self.inner = inner
        self.name = inner.name
        self.counts: Counter[str] = Counter()
        self.fail = Counter(fail or {})

    @property
    def retry_interval(self) -> float:
        return self.inner.retry_interval

    def key(self, *parts: str) -> str:
        return self.inner.key(*parts)

    async def run(self, script: str, keys: Sequence[str], args: Sequence[Any], *, operation: str) -> Any:
        self.counts[operation] += 1
        if self.fail[operation] > 0:
            self.fail[operation] -= 1
            raise StoreUnavailableError(self.name, operation)
        return await self.inner.run(script, keys, args, operation=operation)

    def health(self) -> Any:
        return self.inner.health()

    def describe(self) -> dict[str, Any]:
        return self.inner.describe()

    async def aclose(self) -> None:
        await self.inner.aclose()


def pair(url: str, per: float = 0.3, **options: Any) -> tuple[RateLimiter, RateLimiter, Steps]:
    """Two limiters of 1 request per ``per`` sharing one quota, as two processes would (two connection pools); the
    second counts its steps."""
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    counted = Steps(RedisStore(url, prefix=prefix))
    a = RateLimiter(requests=1, per=per, store=RedisStore(url, prefix=prefix), name="q", **options)
    return a, RateLimiter(requests=1, per=per, store=counted, name="q", **options), counted


async def test_a_held_admission_counts_and_its_window_starts_at_its_answer(redis_url: str) -> None:
    """1 per 0.3 s: A's call runs 0.6 s; B (another process) arriving meanwhile is admitted 0.3 s after A's
    answer, not 0.3 s after A's admission. B polls while A's entry is held (its lease is no real time): one step
    per ``per / 10``, about 17 for 0.5 s, then one exact sleep until the window ends."""
    first, second, steps = pair(redis_url)
    program = Stamps()
    a, b = Pipeline(program, first), Pipeline(program, second)
    running = asyncio.create_task(a(question="a", latency=0.6))
    await asyncio.sleep(0.1)
    arrived = now()
    await b(question="b")
    await running
    answered = program.time_of("a") + 0.6
    assert answered + 0.3 - GUARD <= program.time_of("b") < answered + 0.3 + 0.2
    held_for = answered - arrived
    assert 3 <= steps.counts["admit"] <= held_for / 0.03 + 4  # the extra steps the cap costs: about held_for / poll
    for limiter in (first, second):
        await limiter.options.store.aclose()  # type: ignore[union-attr]


async def test_the_answer_is_one_step_with_its_reconciliation(redis_url: str) -> None:
    """Counted from the answer, an uncontended call costs two steps: its admission and its answer, the token
    reconciliation folded into the answer's step (an 80-token estimate that used 10 leaves room for 80 more)."""
    steps = Steps(fresh(redis_url))
    program = Stamps()
    limiter = RateLimiter(Limit.tokens(100, 1.0), Limit.requests(5, 1.0), estimate_tokens=by_tokens_input, store=steps)
    pipeline = Pipeline(program, limiter)
    start = now()
    await pipeline(question="a", tokens=80, actual=10)
    assert dict(steps.counts) == {"admit": 1, "settle": 1}
    await pipeline(question="b", tokens=80, actual=80)
    assert program.time_of("b") - start < 0.3 and dict(steps.counts) == {"admit": 2, "settle": 2}
    await steps.aclose()


async def test_counted_from_admission_on_a_store_the_window_starts_at_admission(redis_url: str) -> None:
    """The same run counted from admission: B goes 0.3 s after A's admission, while A still runs."""
    first, second, _ = pair(redis_url, counts_from="admission")
    program = Stamps()
    a, b = Pipeline(program, first), Pipeline(program, second)
    running = asyncio.create_task(a(question="a", latency=0.6))
    await asyncio.sleep(0.1)
    await b(question="b")
    await running
    assert 0.3 - GUARD <= program.time_of("b") - program.time_of("a") < 0.5
    for limiter in (first, second):
        await limiter.options.store.aclose()  # type: ignore[union-attr]


async def test_a_call_that_never_reached_the_provider_is_refunded_on_the_server(redis_store: RedisStore) -> None:
    """2 per 1 s under a Cache: the first "x" counts; five cache hits of "x" are admitted and refunded (they never
    reached the program), so "y" still goes at once and only "z" waits for the window."""
    program = Stamps()
    pipeline = Pipeline(program, RateLimiter(requests=2, per=1.0, store=redis_store), Cache())
    start = now()
    for _ in range(6):
        assert await pipeline(question="x") == "x"
    await pipeline(question="y")
    assert program.names == ["x", "y"] and now() - start < 0.5
    await pipeline(question="z")
    assert program.time_of("z") - program.time_of("x") >= 1.0 - GUARD


async def test_a_crashed_holders_lease_ends_its_held_admission(redis_url: str) -> None:
    """A process holding 1-per-0.3-s under a 0.8 s deadline is killed inside its call: the held entry leaves when
    its lease ends (admission + deadline + per, about 1.1 s), not after HOLD_CAP."""
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    holder = ROOT / "tests" / "middleware" / "ratelimit_holder.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = ["--redis", redis_url, "--prefix", prefix, "--per", "0.3", "--deadline", "0.8"]
    process = await asyncio.create_subprocess_exec(sys.executable, str(holder), *args, stdout=subprocess.PIPE, env=env)
    store = RedisStore(redis_url, prefix=prefix)
    try:
        assert process.stdout is not None
        assert (await asyncio.wait_for(process.stdout.readline(), 60)).strip() == b"admitted"
        process.kill()
        await asyncio.wait_for(process.wait(), 10)
        killed = now()
        program = Stamps()
        await asyncio.wait_for(Pipeline(program, RateLimiter(requests=1, per=0.3, store=store, name="q"))("x"), 5)
        assert 0.6 < program.time_of("x") - killed < 1.1 + 0.3
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await store.aclose()


async def test_a_cancelled_or_failed_held_call_starts_its_window_when_it_ends(redis_url: str) -> None:
    """A's held call is cancelled at 0.2 s, then another fails at 0.2 s: each time B is admitted 0.3 s after that
    end (the call reached the provider), never held up by a lease; no task is left behind."""
    first, second, _ = pair(redis_url)
    program = Stamps()

    async def failing(question: str) -> str:
        program.admitted.append((now(), question))
        await asyncio.sleep(0.2)
        raise RuntimeError("provider broke")

    a, b = Pipeline(program, first), Pipeline(program, second)
    running = asyncio.create_task(a(question="cancelled", latency=5.0))
    await asyncio.sleep(0.2)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    ended = now()
    await b(question="after-cancel")
    assert 0.3 - GUARD <= program.time_of("after-cancel") - ended < 0.3 + 0.2
    await asyncio.sleep(0.3)
    with pytest.raises(RuntimeError):
        await Pipeline(failing, first)(question="failed")
    ended = now()
    await b(question="after-failure")
    assert 0.3 - GUARD <= program.time_of("after-failure") - ended < 0.3 + 0.2
    assert not other_tasks()
    for limiter in (first, second):
        await limiter.options.store.aclose()  # type: ignore[union-attr]


async def test_a_listener_stopping_a_waited_call_refunds_its_held_admission(redis_url: str) -> None:
    """A listener stops B's call on its RateLimitWaited (a BaseException: one that asks to stop, which propagates):
    B's held admission is refunded, so A's next call goes when A's first leaves the window, not after a lease."""

    class Stop(BaseException):
        pass

    def stop(event: Event) -> None:
        if isinstance(event, RateLimitWaited):
            raise Stop

    first, second, _ = pair(redis_url)
    program = Stamps()
    a, b = Pipeline(program, first), Pipeline(program, second, listeners=[stop])
    await a(question="a")
    with pytest.raises(Stop):
        await b(question="b")
    start = now()
    await asyncio.wait_for(a(question="c"), 2.0)
    assert program.names == ["a", "c"] and now() - start < 0.3
    for limiter in (first, second):
        await limiter.options.store.aclose()  # type: ignore[union-attr]


async def test_an_answer_the_store_failed_to_take_is_replayed_before_the_next_step(redis_url: str) -> None:
    """B's settle step fails once (no deadline: its lease would be HOLD_CAP): B keeps the answer and replays it
    before its next admission, so the window ends 0.3 s after the replay, not 600 s later; A sees it too."""
    first, second, steps = pair(redis_url)
    steps.fail["settle"] = 1
    program = Stamps()
    a, b = Pipeline(program, first), Pipeline(program, second)
    await b(question="b1")
    start = now()
    await asyncio.wait_for(b(question="b2"), 2.0)
    assert 0.3 - GUARD <= program.time_of("b2") - start < 0.3 + 0.3
    assert steps.counts["settle"] == 3  # the failed one, its replay, b2's own
    await asyncio.sleep(0.3)
    start = now()
    await asyncio.wait_for(a(question="a"), 2.0)
    assert now() - start < 0.3
    for limiter in (first, second):
        await limiter.options.store.aclose()  # type: ignore[union-attr]


async def test_the_local_lanes_hold_during_an_outage_and_release_on_every_path() -> None:
    """The store is down: the local fallback counts from the answer too (1 per 0.3 s: a 0.4 s call holds the next
    until 0.7 s), a cancelled and a refunded call leave nothing held (a cache hit goes at once after them)."""
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.2, retry_interval=5.0)
    program = Stamps()
    pipeline = Pipeline(program, RateLimiter(requests=1, per=0.3, store=store), Cache())
    start = now()
    await asyncio.gather(pipeline(question="a", latency=0.4), pipeline(question="b"))
    assert program.time_of("b") - start >= 0.7 - GUARD
    await asyncio.sleep(0.3)
    running = asyncio.create_task(pipeline(question="c", latency=5.0))
    await asyncio.sleep(0.1)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        await running
    await asyncio.sleep(0.3)
    start = now()
    for _ in range(3):
        assert await pipeline(question="a", latency=0.4) == "a"  # cache hits: refunded, each admitted at once
    assert now() - start < 0.2
    assert not other_tasks()
    await store.aclose()


# ---------------------------------------------------------------------------------------- what it reports


async def test_describe_names_the_store_without_its_password_and_health_adds_the_store(redis_url: str) -> None:
    limiter = RateLimiter(requests=5, store=RedisStore("redis://user:s3cret@127.0.0.1:6399/0"))
    described = limiter.describe()
    assert described["options"]["store"]["store"] == "RedisStore"
    assert described["options"]["on_store_failure"] == "local"
    assert "s3cret" not in str(described)
    store = fresh(redis_url)
    limiter = RateLimiter(requests=5, store=store)
    await Pipeline(Stamps(), limiter)(question="a")
    health = limiter.health()
    assert health.status == "ok" and health.details["store_ok"] is True and health.details["store"] == store.name
    await store.aclose()


async def test_a_call_that_waited_on_the_server_emits_waited(redis_store: RedisStore) -> None:
    events: list[Event] = []
    pipeline = Pipeline(Stamps(), RateLimiter(requests=1, per=0.2, store=redis_store), listeners=[events.append])
    await pipeline(question="a")
    assert events == []
    await pipeline(question="b")
    waited = [e for e in events if isinstance(e, RateLimitWaited)]
    assert len(waited) == 1 and 0.2 - GUARD <= waited[0].waited < 0.5


async def test_max_wait_shorter_than_the_servers_wait_is_rejected_at_once(redis_store: RedisStore) -> None:
    pipeline = Pipeline(Stamps(), RateLimiter(requests=1, per=2.0, max_wait=0.5, store=redis_store))
    await pipeline(question="a")
    start = now()
    with pytest.raises(RateLimitedError) as caught:
        await pipeline(question="b")
    assert now() - start < 0.3 and 1.5 < caught.value.retry_after <= 2.0


# ------------------------------------------------------------------------------------------- many processes


@pytest.mark.parametrize(("counts_from", "margin"), [("answer", 0.0), ("admission", 0.3)])
async def test_four_processes_never_exceed_the_shared_limit_in_the_servers_journal(
    redis_url: str, counts_from: str, margin: float
) -> None:
    """4 worker processes x 250 calls share 250 requests per 1 s on Redis against the chaos server, whose own
    journal and quota are the judge: no window of 1 s holds more than 250 requests, and no call got a 429.
    Counted from the answer the limiter's period is the quota's own, 1 s: an entry is held until its answer, so it
    cannot leave our window before the provider's. Counted from admission it needs a margin, 1.3 s: it covers the
    transit between the server's admission and the chaos server's receipt on a loaded machine (1.15 s drew 429s
    at load average 8 on 2 cores)."""
    amount, period = 250, 1.0  # four windows: every window boundary is crossed by all four processes at once
    prefix = f"rl-{uuid.uuid4().hex[:12]}"
    worker = ROOT / "tests" / "middleware" / "ratelimit_worker.py"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    async with ChaosServer(quota=Quota(requests_per_minute=amount, window=period)) as server:
        args = ["--redis", redis_url, "--prefix", prefix, "--target", server.url, "--requests", str(amount)]
        args += ["--per", str(period + margin), "--calls", "250", "--concurrency", "25", "--counts-from", counts_from]
        processes = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                str(worker),
                *args,
                "--worker",
                f"w{n}",
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                env=env,
            )
            for n in range(4)
        ]
        try:
            for process in processes:
                assert process.stdout is not None
                assert (await asyncio.wait_for(process.stdout.readline(), 60)).strip() == b"ready"
            for process in processes:
                assert process.stdin is not None
                process.stdin.write(b"go\n")
                await process.stdin.drain()
            outputs = [await asyncio.wait_for(process.communicate(), 60) for process in processes]
        finally:
            for process in processes:
                if process.returncode is None:
                    process.kill()
                    await process.wait()
        reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
        journal = [entry.time for entry in server.journal]
        statuses = [entry.status for entry in server.journal]
    assert sum(r["statuses"].get("200", 0) for r in reports) == 1000
    assert all(not r["raised"] for r in reports)
    assert len(journal) == 1000 and 429 not in statuses
    times = sorted(journal)
    most = max(sum(1 for t in times[i:] if t < start + period) for i, start in enumerate(times))
    assert most <= amount
    assert times[-1] - times[0] < 1000 / amount * (period + margin) + 2.0  # bounded, and the quota was kept busy


def test_a_bad_failure_mode_is_named() -> None:
    with pytest.raises(ConfigurationError, match=r"RateLimiter\.on_store_failure"):
        RateLimiter(requests=5, store=RedisStore("redis://127.0.0.1:1/0"), on_store_failure="ignore")  # type: ignore[arg-type]
