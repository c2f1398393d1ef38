"""``pipeline.map`` and ``pipeline.imap``: one Outcome per input, a bounded window of calls, clean cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import dspy
import pytest
from rich.console import Console

from resilient_dspy import (
    Cache,
    Fallback,
    InvalidInputError,
    Pipeline,
    RetriesExhaustedError,
    Retry,
    Static,
)
from resilient_dspy.core.outcome import BatchCounts, Outcome
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.observe.progress import ProgressBar
from resilient_dspy.testing import FaultInjectingLM
from tests.conftest import other_tasks

ROOT = Path(__file__).resolve().parent.parent


async def shout(question: str) -> str:
    """Answers after a delay read from the question ("slow" ones take longer); "bad" ones always fail."""
    await asyncio.sleep(5.0 if "slow" in question else 1.0)
    if "bad" in question:
        raise ConnectionError(f"cannot answer {question!r}")
    return question.upper()


class Gauge:
    """An async program that records how many of its calls run at once, and every call it saw cancelled."""

    def __init__(self, delay: float = 1.0) -> None:
        self.delay, self.now, self.most, self.cancelled = delay, 0, 0, 0

    async def __call__(self, question: str) -> str:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.now -= 1
        return question


async def test_map_returns_one_outcome_per_input_in_input_order() -> None:
    """Values in input order whatever order the calls finish in, with each call's record (attempts, served_by)."""
    pipeline = Pipeline(shout)
    outcomes = await pipeline.map(["slow a", "b", "c"], concurrency=3)
    assert [o.value for o in outcomes] == ["SLOW A", "B", "C"]
    assert all(o.ok and o.error is None and o.served_by == "primary" and o.attempts == 1 for o in outcomes)
    assert outcomes[0].duration == pytest.approx(5.0) and outcomes[1].duration == pytest.approx(1.0)


async def test_a_failed_call_is_an_outcome_with_its_typed_error() -> None:
    """With return_exceptions (the default) a failure does not end the batch: its outcome carries the typed error
    and the attempts it took, and the other calls answer."""
    pipeline = Pipeline(shout, Retry(3, base_delay=0.1))
    ok, bad = await pipeline.map(["fine", "bad one"])
    assert ok.ok and ok.value == "FINE"
    assert not bad.ok and bad.value is None
    assert isinstance(bad.error, RetriesExhaustedError) and isinstance(bad.error.__cause__, ConnectionError)
    assert (bad.attempts, bad.retries) == (3, 2)


async def test_without_return_exceptions_the_first_failure_is_raised_and_nothing_is_left_running() -> None:
    gauge = Gauge(delay=10.0)

    async def program(question: str) -> str:
        if question == "bad":
            raise ConnectionError("down")
        return await gauge(question)

    with pytest.raises(ConnectionError):
        await Pipeline(program).map(["a", "b", "bad", "c"], concurrency=4, return_exceptions=False)
    assert gauge.cancelled == 3  # a, b and c were in flight
    assert other_tasks() == set()


async def test_inputs_may_be_questions_dicts_and_examples() -> None:
    """A string is the first input; a dict gives its inputs; an Example its with_inputs fields, or without them the
    program's inputs it holds (its label ``answer`` left out)."""

    async def ask(question: str, context: str = "-") -> str:
        return f"{question}|{context}"

    items = [
        "q1",
        {"question": "q2", "context": "c2"},
        dspy.Example(question="q3", context="c3", answer="gold").with_inputs("question"),
        dspy.Example(question="q4", context="c4", answer="gold"),
    ]
    outcomes = await Pipeline(ask).map(items)
    assert [o.value for o in outcomes] == ["q1|-", "q2|c2", "q3|-", "q4|c4"]


async def test_an_input_the_program_does_not_take_fails_that_item_only() -> None:
    outcomes = await Pipeline(shout).map(["fine", {"questoin": "typo"}])
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, InvalidInputError) and outcomes[1].attempts == 0


async def test_calls_in_flight_never_exceed_the_concurrency_and_fill_it() -> None:
    gauge = Gauge()
    outcomes = await Pipeline(gauge).map([f"q{i}" for i in range(50)], concurrency=7)
    assert len(outcomes) == 50 and gauge.most == 7


async def test_inputs_are_read_only_as_calls_finish() -> None:
    """The window reads the next input when a call ends: never one task per input up front."""
    read = 0

    def questions() -> Iterator[str]:
        nonlocal read
        for i in range(1000):
            read += 1
            yield f"q{i}"

    seen = 0
    async with contextlib.aclosing(Pipeline(Gauge()).imap(questions(), concurrency=5)) as stream:
        async for _ in stream:
            seen += 1
            assert read <= seen + 5
    assert seen == 1000


async def test_imap_yields_each_outcome_as_its_call_finishes() -> None:
    finished = [(index, outcome.value) async for index, outcome in Pipeline(shout).imap(["slow a", "b", "slow c"])]
    assert finished == [(1, "B"), (0, "SLOW A"), (2, "SLOW C")]


async def test_an_async_iterable_of_inputs_is_read_lazily_too() -> None:
    async def questions() -> AsyncIterator[str]:
        for i in range(20):
            await asyncio.sleep(0.1)
            yield f"q{i}"

    gauge = Gauge()
    outcomes = await Pipeline(gauge).map(questions(), concurrency=4)
    assert [o.value for o in outcomes] == [f"q{i}" for i in range(20)] and gauge.most <= 4


async def test_cancelling_the_caller_cancels_the_calls_in_flight_and_leaves_no_task() -> None:
    gauge = Gauge(delay=100.0)
    batch = asyncio.create_task(Pipeline(gauge).map([f"q{i}" for i in range(100)], concurrency=8))
    await asyncio.sleep(1.0)
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert gauge.cancelled == 8 and gauge.now == 0
    assert other_tasks() == set()


async def test_leaving_imap_early_cancels_the_rest_when_it_is_closed() -> None:
    gauge = Gauge()

    async def staggered(question: str) -> str:
        await asyncio.sleep(int(question))  # the calls finish one by one
        return await gauge(question)

    async with contextlib.aclosing(Pipeline(staggered).imap([str(i) for i in range(100)], concurrency=10)) as stream:
        async for index, _ in stream:
            if index == 3:
                break
    assert gauge.cancelled > 0 and gauge.now == 0
    assert other_tasks() == set()


async def test_an_error_of_the_input_iterator_ends_the_batch_and_leaves_no_task() -> None:
    def questions() -> Iterator[str]:
        yield "a"
        raise OSError("the input file went away")

    with pytest.raises(OSError, match="went away"):
        await Pipeline(Gauge(delay=50.0)).map(questions())
    assert other_tasks() == set()


async def test_callers_context_reaches_every_call() -> None:
    """``dspy.context(lm=...)`` around map applies inside each call's task, as around a single call."""
    lm = FaultInjectingLM(answers={"What is DSPy?": "A framework."})
    pipeline = Pipeline(dspy.Predict("question -> answer"))
    with dspy.context(lm=lm):
        outcomes = await pipeline.map(["What is DSPy?"] * 3, concurrency=3)
    assert [o.value.answer for o in outcomes] == ["A framework."] * 3 and lm.requests == 3


async def test_an_empty_batch_returns_no_outcome() -> None:
    assert await Pipeline(shout).map([]) == []


@pytest.mark.parametrize("concurrency", [0, -1, 1.5, True, "8"])
async def test_a_bad_concurrency_is_refused(concurrency: object) -> None:
    with pytest.raises(ConfigurationError, match="concurrency"):
        await Pipeline(shout).map(["a"], concurrency=concurrency)  # type: ignore[arg-type]


@pytest.mark.parametrize("inputs", ["What is DSPy?", {"question": "What is DSPy?"}, 42])
async def test_one_item_instead_of_an_iterable_of_them_is_refused(inputs: object) -> None:
    """A lone string (or dict) is iterable too, but running one call per character is never what was meant."""
    with pytest.raises(ConfigurationError, match="inputs"):
        await Pipeline(shout).map(inputs)  # type: ignore[arg-type]


async def test_counts_tell_answers_fallbacks_failures_retries_and_cache_hits_apart() -> None:
    failed_once: set[str] = set()

    async def flaky(question: str) -> str:
        if question == "bad" or (question == "retry" and question not in failed_once):
            failed_once.add(question)
            raise ConnectionError("down")
        return question

    primary = Pipeline(flaky, Retry(2, base_delay=0.1), Cache())
    counts = BatchCounts()
    for outcome in await primary.map(["a", "a", "bad", "retry"], concurrency=1):
        counts.add(outcome)
    assert (counts.done, counts.ok, counts.failed, counts.retried, counts.cache_hits) == (4, 3, 1, 2, 1)
    served = await Pipeline(flaky, Fallback(Static(answer="sorry"))).map(["bad"])
    counts.add(served[0])
    assert (counts.fallback, counts.ok, counts.failed) == (1, 3, 1)


async def test_progress_on_a_terminal_draws_the_counts() -> None:
    screen = io.StringIO()
    bar = ProgressBar("answers", console=Console(file=screen, force_terminal=True, width=120))
    await Pipeline(shout, Retry(2, base_delay=0.1)).map(["a", "bad", "c"], progress=bar)
    assert (bar.counts.total, bar.counts.done, bar.counts.ok, bar.counts.failed) == (3, 3, 2, 1)
    drawn = screen.getvalue()
    assert "answers" in drawn and "3/3" in drawn and "\x1b[" in drawn


async def test_progress_is_silent_when_not_a_terminal_unless_asked(capsys: pytest.CaptureFixture[str]) -> None:
    """``progress=True`` off a terminal prints nothing; ``always=True`` there prints the end state once, plain."""
    await Pipeline(shout).map(["a", "b"], progress=True)
    assert capsys.readouterr() == ("", "")
    log = io.StringIO()
    bar = ProgressBar("answers", console=Console(file=log, width=120), always=True)
    await Pipeline(shout).map(iter(["a", "b"]), progress=bar)
    lines = log.getvalue().splitlines()
    assert len(lines) == 1 and "2/2" in lines[0] and "\x1b" not in lines[0]


def test_outcome_of_a_success_is_ok() -> None:
    assert Outcome("x", "primary", 1, 0, 0.1).ok
    assert not Outcome(None, "primary", 1, 0, 0.1, error=ValueError("no")).ok


_FLAT_MEMORY = textwrap.dedent(
    """
    import asyncio, os, sys
    from resilient_dspy import Pipeline

    def resident() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    async def echo(question: str) -> str:
        return question

    async def main(count: int) -> None:
        pipeline = Pipeline(echo)
        await pipeline.map(["warm-up"] * 1000, concurrency=64)
        before = peak = resident()
        seen = 0
        async for _ in pipeline.imap((f"question {i}" for i in range(count)), concurrency=64):
            seen += 1
            if seen % 10_000 == 0:
                peak = max(peak, resident())
        print(seen, peak - before)

    asyncio.run(main(int(sys.argv[1])))
    """
)


@pytest.mark.skipif(sys.platform != "linux", reason="reads the resident memory from /proc/self/statm")
@pytest.mark.looptime(False)
def test_a_million_inputs_from_a_generator_run_in_flat_memory(tmp_path: Path) -> None:
    """1,000,000 inputs through imap: resident memory grows by less than 32 MiB (one task per input: GiBs)."""
    script = tmp_path / "flat.py"
    script.write_text(_FLAT_MEMORY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, str(script), "1000000"], capture_output=True, text=True, timeout=600, env=env, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    seen, grown = map(int, done.stdout.split())
    assert seen == 1_000_000
    assert grown < 32 * 2**20
