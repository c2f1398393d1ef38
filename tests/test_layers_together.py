"""Layers together: what one layer counts of another's outcomes (issue 13, items 2, 3, 6, 8, 11, 12).

An outcome judges the provider only if the call reached it: a cache hit, a coalesced single-flight follower and a
rejection by an inner layer are neutral for the breaker and the retry budget; a nested pipeline's record (attempts,
served_by) reaches the outer one; Retry waits for an opened circuit instead of sleeping for nothing.
Async tests run on looptime's virtual clock.
"""

from __future__ import annotations

import asyncio
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import (
    Cache,
    CircuitBreaker,
    CircuitOpenError,
    Fallback,
    Pipeline,
    RateLimiter,
    RetriesExhaustedError,
    Retry,
    RetryBudget,
    Static,
    Timeout,
    UseProgram,
    by_model,
)
from resilient_dspy.errors import ResilienceWarning
from resilient_dspy.middleware.breaker import CircuitState
from tests.conftest import run_virtual


def server_error() -> Exception:
    return dspy.LMServerError("injected 503", status=503)


class Provider:
    """An async program that answers ``answer:<question>`` after ``latency`` s, or raises while ``down``."""

    def __init__(self, latency: float = 0.0) -> None:
        self.latency = latency
        self.down = False
        self.requests = 0

    async def __call__(self, question: str) -> str:
        self.requests += 1
        await asyncio.sleep(self.latency)
        if self.down:
            raise server_error()
        return f"answer:{question}"


async def settle(*calls: Any) -> list[Any]:
    return await asyncio.gather(*calls, return_exceptions=True)


# ------------------------------------------------------------------ item 2: a shared failure counts once


async def test_a_shared_single_flight_failure_counts_once_in_the_breaker() -> None:
    provider = Provider(latency=1.0)
    provider.down = True
    breaker = CircuitBreaker(failure_threshold=2)
    pipeline = Pipeline(provider, breaker, Cache())

    results = await settle(*(pipeline("same") for _ in range(10)))

    assert all(isinstance(r, dspy.LMServerError) for r in results)
    assert provider.requests == 1
    snapshot = breaker.snapshot()
    assert snapshot.state is CircuitState.CLOSED
    assert snapshot.consecutive_failures == 1


async def test_a_follower_timing_out_while_it_waits_is_not_a_provider_failure() -> None:
    provider = Provider(latency=1.0)
    breaker = CircuitBreaker(failure_threshold=2)
    pipeline = Pipeline(provider, breaker, Timeout(0.5), Cache())

    results = await settle(*(pipeline("same") for _ in range(10)))

    assert all(isinstance(r, TimeoutError) for r in results)
    assert provider.requests == 1
    assert breaker.snapshot().consecutive_failures == 1  # the leader's own timeout, once
    assert breaker.snapshot().state is CircuitState.CLOSED


async def test_one_shared_503_does_not_open_the_circuit_for_unrelated_questions() -> None:
    provider = Provider(latency=1.0)
    provider.down = True
    pipeline = Pipeline(
        provider,
        Fallback(Static(lambda inputs: "sorry")),
        CircuitBreaker(failure_threshold=5, break_duration=30.0),
        Cache(),
    )
    await settle(*(pipeline("same") for _ in range(10)))
    provider.down = False

    outcome = await pipeline.invoke("unrelated")

    assert (outcome.value, outcome.served_by) == ("answer:unrelated", "primary")


async def test_retrying_a_shared_failure_spends_the_retry_budget_once() -> None:
    provider = Provider(latency=1.0)
    provider.down = True
    # a budget of exactly one retry in the window (no ratio): the followers' retries must not use it up
    retry = Retry(2, base_delay=0.0, jitter="none", budget=RetryBudget(ratio=0.0, min_per_second=0.1, window=10.0))
    pipeline = Pipeline(provider, retry, Cache())
    results = await settle(*(pipeline("same") for _ in range(5)))
    assert all(isinstance(r, RetriesExhaustedError) for r in results)
    assert [r.reason for r in results].count("budget") == 0  # every caller got its second attempt
    assert provider.requests == 2  # one leader per round: the round's followers shared it


# ------------------------------------------------------------------ item 11: cache hits are not provider successes


async def test_cache_hits_between_failures_do_not_reset_the_failure_count() -> None:
    provider = Provider()
    breaker = CircuitBreaker(failure_threshold=3)
    pipeline = Pipeline(provider, breaker, Cache())
    await pipeline("cached")
    provider.down = True

    for question in ("a", "b"):
        with pytest.raises(dspy.LMServerError):
            await pipeline(question)
        assert await pipeline("cached") == "answer:cached"  # a hit, while the circuit is closed
    with pytest.raises(dspy.LMServerError):
        await pipeline("c")

    assert breaker.snapshot().state is CircuitState.OPEN
    assert provider.requests == 4


async def test_a_half_open_probe_served_by_the_cache_does_not_close_the_circuit() -> None:
    provider = Provider()
    breaker = CircuitBreaker(failure_threshold=1, break_duration=5.0)
    pipeline = Pipeline(provider, breaker, Cache())
    await pipeline("cached")
    provider.down = True
    with pytest.raises(dspy.LMServerError):
        await pipeline("a")
    await asyncio.sleep(5.0)

    assert await pipeline("cached") == "answer:cached"
    assert breaker.snapshot().state is CircuitState.HALF_OPEN  # the provider has not been probed yet
    with pytest.raises(dspy.LMServerError):
        await pipeline("b")  # the real probe
    assert breaker.snapshot().state is CircuitState.OPEN


# ------------------------------------------------------------------ item 12: a nested pipeline's outcome


async def test_a_nested_pipelines_fallback_answer_is_not_cached_by_the_outer_cache() -> None:
    provider = Provider()
    provider.down = True
    inner = Pipeline(provider, Fallback(Static(lambda inputs: "sorry", name="apology")))
    outer = Pipeline(inner, Cache())

    first = await outer.invoke("q")
    provider.down = False
    second = await outer.invoke("q")

    assert (first.value, first.served_by) == ("sorry", "apology")
    assert (second.value, second.served_by) == ("answer:q", "primary")


async def test_a_nested_pipelines_attempts_and_retries_reach_the_outer_outcome() -> None:
    provider = Provider()
    outcomes = iter([server_error(), server_error()])

    async def flaky(question: str) -> str:
        error = next(outcomes, None)
        if error is not None:
            raise error
        return await provider(question)

    inner = Pipeline(flaky, Retry(3, base_delay=0.0, jitter="none"), Cache())
    outer = Pipeline(inner)
    first = await outer.invoke("q")
    hit = await outer.invoke("q")

    assert (first.attempts, first.retries) == (3, 2)
    assert (hit.attempts, hit.retries) == (0, 0)  # the inner cache answered: no program ran


# ------------------------------------------------------------------ item 6: served_by and alternative filters


async def test_served_by_names_the_primary_when_the_primary_answers_a_later_retry() -> None:
    provider = Provider()
    failures = iter([server_error()])

    async def flaky(question: str) -> str:
        error = next(failures, None)
        if error is not None:
            raise error
        return await provider(question)

    with pytest.warns(ResilienceWarning, match="Fallback"):  # Retry outside Fallback, on purpose: warned at build
        pipeline = Pipeline(
            flaky,
            Retry(2, base_delay=0.0, jitter="none", retry_on_result=lambda value: value == "sorry"),
            Fallback(Static(lambda inputs: "sorry", name="apology")),
        )
    outcome = await pipeline.invoke("q")
    assert (outcome.value, outcome.served_by) == ("answer:q", "primary")


class ContextTooLong(Exception):
    pass


class Overloaded(Exception):
    pass


async def test_an_alternatives_filter_is_matched_against_the_most_recent_error() -> None:
    async def program(question: str) -> str:
        raise ContextTooLong()

    async def larger(question: str) -> str:
        raise Overloaded()

    pipeline = Pipeline(
        program,
        Fallback(
            UseProgram(larger, name="larger", on=ContextTooLong),
            Static(lambda inputs: "not for overload", name="wrong", on=ContextTooLong),
            Static(lambda inputs: "busy", name="busy", on=Overloaded),
        ),
    )
    outcome = await pipeline.invoke("q")
    assert (outcome.value, outcome.served_by) == ("busy", "busy")


async def test_an_alternative_whose_filter_does_not_match_is_skipped() -> None:
    async def program(question: str) -> str:
        raise Overloaded()

    pipeline = Pipeline(
        program,
        Fallback(
            Static(lambda inputs: "larger", name="larger", on=ContextTooLong),
            Static(lambda inputs: "busy", name="busy", on=Overloaded),
        ),
    )
    outcome = await pipeline.invoke("q")
    assert outcome.served_by == "busy"


# ------------------------------------------------------------------ item 8: Retry learns an opened circuit's wait


async def test_retry_waits_exactly_the_break_when_the_failure_opened_the_circuit_below() -> None:
    provider = Provider()
    provider.down = True
    pipeline = Pipeline(
        provider,
        Retry(2, base_delay=0.1, jitter="none", max_retry_after=60.0),
        CircuitBreaker(failure_threshold=1, break_duration=5.0),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert provider.requests == 2  # the second attempt ran as the half-open probe, not rejected
    assert loop.time() - started == pytest.approx(5.0)
    assert isinstance(caught.value.__cause__, dspy.LMServerError)


async def test_retry_gives_up_at_once_when_the_opened_circuit_outlasts_the_deadline() -> None:
    provider = Provider()
    provider.down = True
    pipeline = Pipeline(
        provider,
        Timeout(3.0),
        Retry(3, base_delay=0.1, jitter="none"),
        CircuitBreaker(failure_threshold=1, break_duration=5.0),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetriesExhaustedError) as caught:
        await pipeline("q")
    assert caught.value.reason == "deadline"
    assert provider.requests == 1
    assert loop.time() - started == pytest.approx(0.0)


async def test_retry_gives_up_at_once_when_the_opened_circuit_outlasts_max_retry_after() -> None:
    provider = Provider()
    provider.down = True
    pipeline = Pipeline(
        provider,
        Retry(3, base_delay=0.1, jitter="none", max_retry_after=2.0),
        CircuitBreaker(failure_threshold=1, break_duration=5.0),
    )
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(RetriesExhaustedError):
        await pipeline("q")
    assert provider.requests == 1
    assert loop.time() - started == pytest.approx(0.0)


# ------------------------------------------------------------------ item 3: an LM's identity includes its endpoint


def _lm(api_base: str | None) -> dspy.LM:
    extra = {} if api_base is None else {"api_base": api_base}
    return dspy.LM("openai/same-model", api_key="x", cache=False, num_retries=0, **extra)


async def test_by_model_tells_two_endpoints_of_one_model_apart() -> None:
    pipeline = Pipeline(Provider())
    call = pipeline.new_call({"question": "q"})
    keys = set()
    for api_base in (None, "http://127.0.0.1:9001/v1", "http://127.0.0.1:9002/v1"):
        with dspy.context(lm=_lm(api_base)):
            keys.add(by_model(call))
    assert len(keys) == 3


async def test_a_failing_primary_endpoint_does_not_open_the_backups_circuit() -> None:
    primary, backup = _lm("http://127.0.0.1:9001/v1"), _lm("http://127.0.0.1:9002/v1")
    up = {id(backup)}

    async def program(question: str) -> str:
        lm = dspy.settings.lm
        if id(lm) not in up:
            raise server_error()
        return "ok"

    breaker = CircuitBreaker(failure_threshold=2, key=by_model)
    pipeline = Pipeline(program, breaker)
    for _ in range(2):
        with dspy.context(lm=primary), pytest.raises(dspy.LMServerError):
            await pipeline("q")
    with dspy.context(lm=backup):
        assert await pipeline("q") == "ok"
    states = {snapshot.state for snapshot in breaker.snapshots().values()}
    assert states == {CircuitState.OPEN, CircuitState.CLOSED}


# ------------------------------------------------------------------ Chaos stands in for the provider


async def test_faults_injected_by_chaos_count_as_provider_failures_in_the_breaker() -> None:
    from resilient_dspy import Chaos

    provider = Provider()
    breaker = CircuitBreaker(failure_threshold=2)
    pipeline = Pipeline(provider, breaker, Cache(), Chaos(script=["server_error", "server_error"]))
    for question in ("a", "b"):
        outcome = await settle(pipeline.invoke(question))
        assert isinstance(outcome[0], dspy.LMServerError)
    assert breaker.snapshot().state is CircuitState.OPEN
    assert provider.requests == 0


async def test_an_injected_fault_counts_as_an_attempt_of_the_call() -> None:
    from resilient_dspy import Chaos

    provider = Provider()
    chaos = Chaos(script=["server_error", "hang"])
    with pytest.warns(ResilienceWarning, match="total"):  # an attempt timeout with no total one: warned at build
        pipeline = Pipeline(provider, Retry(3, base_delay=0.0, jitter="none"), Timeout(1.0), chaos)
    outcome = await pipeline.invoke("q")
    assert (outcome.value, outcome.attempts, outcome.retries) == ("answer:q", 3, 2)


# ------------------------------------------------------------------ item 2: followers do not hold bulkhead slots


class Gauge:
    """An async program that records how many of its calls run at once."""

    def __init__(self, latency: float) -> None:
        self.latency = latency
        self.running = 0
        self.peak = 0
        self.requests = 0

    async def __call__(self, question: str) -> str:
        self.requests += 1
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            await asyncio.sleep(self.latency)
        finally:
            self.running -= 1
        return f"answer:{question}"


async def test_followers_waiting_on_a_shared_call_lend_their_bulkhead_slots_to_other_questions() -> None:
    from resilient_dspy import Bulkhead

    program = Gauge(latency=1.0)
    bulkhead = Bulkhead(2, max_queue=10)
    pipeline = Pipeline(program, bulkhead, Cache())
    loop = asyncio.get_running_loop()
    started = loop.time()
    followers = [asyncio.create_task(pipeline("same")) for _ in range(5)]
    await asyncio.sleep(0)
    other = await pipeline("other")
    assert other == "answer:other"
    assert loop.time() - started == pytest.approx(1.0)  # it ran beside the leader, not after it
    assert await asyncio.gather(*followers) == ["answer:same"] * 5
    assert program.requests == 2
    assert bulkhead.snapshot().in_flight == 0


async def test_a_follower_whose_leader_is_cancelled_takes_a_slot_again_before_it_leads() -> None:
    from resilient_dspy import Bulkhead

    program = Gauge(latency=1.0)
    bulkhead = Bulkhead(2, max_queue=10)
    pipeline = Pipeline(program, bulkhead, Cache())
    leader = asyncio.create_task(pipeline("same"))
    await asyncio.sleep(0)
    follower = asyncio.create_task(pipeline("same"))
    await asyncio.sleep(0)
    others = [asyncio.create_task(pipeline(f"other {i}")) for i in range(3)]
    await asyncio.sleep(0.5)
    leader.cancel()
    results = await asyncio.gather(follower, *others)
    assert results == ["answer:same", *(f"answer:other {i}" for i in range(3))]
    assert program.peak <= 2  # the re-leading follower never ran beyond the bulkhead's limit
    assert bulkhead.snapshot().in_flight == 0
    with pytest.raises(asyncio.CancelledError):
        await leader


async def test_a_follower_retrying_its_leaders_failure_holds_a_slot_again_when_it_leads() -> None:
    from resilient_dspy import Bulkhead

    program = Gauge(latency=1.0)
    failures = iter([server_error()])

    async def flaky(question: str) -> str:
        error = next(failures, None) if question == "same" else None
        await program(question)
        if error is not None:
            raise error
        return f"answer:{question}"

    decisions = iter([False])  # the leader gives up on the shared failure; its follower retries and leads
    retry = Retry(2, base_delay=0.5, jitter="none", budget=None, retry_on=lambda error: next(decisions, True))
    bulkhead = Bulkhead(2, max_queue=10)
    pipeline = Pipeline(flaky, bulkhead, retry, Cache())
    calls = [asyncio.create_task(pipeline("same")) for _ in range(2)]
    await asyncio.sleep(0)
    calls += [asyncio.create_task(pipeline(f"other {i}")) for i in range(4)]
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], dspy.LMServerError)
    assert results[1:] == ["answer:same", *(f"answer:other {i}" for i in range(4))]
    assert program.peak <= 2
    assert bulkhead.snapshot().in_flight == 0


# ------------------------------------------------------------------ property: the breaker counts only what reached


class Logged:
    """A provider that logs each request's outcome (True = success) in the order the requests end."""

    def __init__(self) -> None:
        self.down = False
        self.log: list[bool] = []

    async def __call__(self, question: str) -> str:
        try:
            await asyncio.sleep(0.5 if question.endswith("slow") else 0.1)
        except asyncio.CancelledError:  # cut by an attempt timeout: a failed request, as the breaker sees it
            self.log.append(False)
            raise
        ok = not self.down
        self.log.append(ok)
        if not ok:
            raise server_error()
        return f"answer:{question}"


def _trailing_failures(log: list[bool]) -> int:
    count = 0
    for ok in reversed(log):
        if ok:
            break
        count += 1
    return count


_batches = st.lists(
    st.tuples(st.booleans(), st.lists(st.sampled_from(["a", "b", "c", "a-slow", "b-slow"]), min_size=1, max_size=8)),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(batches=_batches, attempt_timeout=st.sampled_from([None, 0.3, 1.0]))
def test_property_the_breaker_counts_exactly_the_provider_outcomes(
    batches: list[tuple[bool, list[str]]], attempt_timeout: float | None
) -> None:
    """Whatever mix of hits, coalesced followers (answered, failed or timed out while waiting) and real requests:
    after every batch the breaker's consecutive-failure count is the provider's own trailing failures."""
    provider = Logged()
    breaker = CircuitBreaker(failure_threshold=1_000)
    layers: list[Any] = [breaker]
    if attempt_timeout is not None:
        layers.append(Timeout(attempt_timeout))
    pipeline = Pipeline(provider, *layers, Cache())

    async def scenario() -> None:
        for down, questions in batches:
            provider.down = down
            await settle(*(pipeline(q) for q in questions))
            assert breaker.snapshot().consecutive_failures == _trailing_failures(provider.log)

    run_virtual(scenario)


async def test_with_no_retry_budget_left_a_shared_failure_is_not_retried_by_its_followers() -> None:
    provider = Provider(latency=1.0)
    provider.down = True
    retry = Retry(3, base_delay=0.0, jitter="none", budget=RetryBudget(ratio=0.0, min_per_second=0.0, window=10.0))
    pipeline = Pipeline(provider, retry, Cache())
    results = await settle(*(pipeline("same") for _ in range(5)))
    assert [r.reason for r in results] == ["budget"] * 5
    assert provider.requests == 1


async def test_calls_queued_below_the_retry_keep_counting_for_its_budget_while_they_are_in_flight() -> None:
    """A burst waits in a Bulkhead below the Retry: 40 s later its calls are still live traffic, so a lone failure
    then may be retried (the budget used to forget them 10 s after they entered)."""
    from resilient_dspy import Bulkhead

    failures = {"q40": 1}

    async def program(question: str) -> str:
        await asyncio.sleep(1.0)
        if failures.get(question):
            failures[question] -= 1
            raise server_error()
        return f"answer:{question}"

    budget = RetryBudget(ratio=0.2, min_per_second=0.0, window=10.0)
    pipeline = Pipeline(program, Retry(2, base_delay=0.0, jitter="none", budget=budget), Bulkhead(1, max_queue=100))
    results = await settle(*(pipeline(f"q{i}") for i in range(50)))
    assert results[40] == "answer:q40"
    assert all(isinstance(r, str) for r in results)


# ------------------------------------------------------------------------ rate limiter ▶ cache / breaker below it


async def test_a_cache_hit_below_the_rate_limiter_spends_none_of_its_quota() -> None:
    """requests=2 per minute above a Cache: five hits of one question are admitted at once and leave the window at
    once (no request reached the provider), so a second question still goes at once, and only 2 are counted."""
    asked: list[str] = []

    async def program(question: str) -> str:
        asked.append(question)
        return f"answer to {question}"

    limiter = RateLimiter(requests=2, per=60.0)
    pipeline = Pipeline(program, limiter, Cache())
    loop = asyncio.get_running_loop()
    start = loop.time()
    for _ in range(6):
        assert await pipeline("same") == "answer to same"
    assert await pipeline("other") == "answer to other"
    assert loop.time() - start == 0.0
    assert asked == ["same", "other"]
    assert limiter.snapshot().limits[0].used == 2.0


async def test_a_call_an_open_circuit_refuses_below_the_rate_limiter_spends_none_of_its_quota() -> None:
    """The circuit below opened: its rejections are refunded, so once it closes the provider's quota is all there."""

    async def failing(question: str) -> str:
        raise server_error()

    limiter = RateLimiter(requests=3, per=60.0)
    pipeline = Pipeline(failing, limiter, CircuitBreaker(failure_threshold=1, break_duration=30.0))
    with pytest.raises(dspy.LMServerError):
        await pipeline("q0")
    for i in range(5):
        with pytest.raises(CircuitOpenError):
            await pipeline(f"q{i + 1}")
    assert limiter.snapshot().limits[0].used == 1.0
