"""Token estimates made before a call: any input, however odd, gets a bounded estimate and never fails the call."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import dspy
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Budget, Limit, Pipeline, RateLimiter
from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS, UNMEASURED_CHARS, ProgramEstimate, estimate_chars
from resilient_dspy.testing import FaultInjectingLM


class Unprintable:
    """An input whose ``str()`` and ``repr()`` raise."""

    def __str__(self) -> str:
        raise ValueError("no text for you")

    __repr__ = __str__


def nested(depth: int, leaf: Any = None) -> list[Any]:
    """A list nested ``depth`` deep, far past the interpreter's recursion limit for ``str()``."""
    value: list[Any] = [] if leaf is None else [leaf]
    for _ in range(depth - 1):
        value = [value]
    return value


async def echo(question: Any) -> str:
    return "answered"


ODD_INPUTS = {
    "unprintable": Unprintable(),
    "nested_100k": nested(100_000),
    "nested_unprintable": nested(5_000, Unprintable()),
    "dict_of_unprintable": {"a": Unprintable(), "b": [1, 2, nested(3_000)]},
}


@pytest.mark.parametrize("value", list(ODD_INPUTS.values()), ids=list(ODD_INPUTS))
async def test_the_rate_limiter_estimates_an_odd_input_and_runs_the_program(value: Any) -> None:
    limiter = RateLimiter(Limit.tokens(10_000_000, per=60.0))
    assert await Pipeline(echo, limiter)(value) == "answered"
    [usage] = limiter.snapshot().limits
    assert DEFAULT_MAX_TOKENS < usage.used < 10_000_000


@pytest.mark.parametrize("value", list(ODD_INPUTS.values()), ids=list(ODD_INPUTS))
async def test_the_budget_estimates_an_odd_input_and_runs_the_program(value: Any) -> None:
    budget = Budget(tokens=10_000_000)
    assert await Pipeline(echo, budget)(value) == "answered"
    assert budget.snapshot().in_flight == 0


def test_a_deeply_nested_input_is_estimated_by_its_size() -> None:
    """100,000 levels of brackets are 200,000 characters: the estimate counts them, without recursion."""
    assert estimate_chars(nested(100_000)) == 2 * 100_000
    assert estimate_chars(Unprintable()) == UNMEASURED_CHARS


leaves = st.one_of(st.none(), st.integers(), st.floats(allow_nan=False), st.text(max_size=5), st.builds(Unprintable))
values = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.tuples(children, children),
        st.dictionaries(st.text(max_size=3), children, max_size=3),
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=values, depth=st.integers(min_value=1, max_value=3_000))
def test_every_input_gets_a_bounded_estimate_that_never_raises(value: Any, depth: int) -> None:
    """Any value, nested deep or not, printable or not: an int >= 0; exactly ``len(str(value))`` when printable."""
    deep = nested(depth, value)
    for candidate in (value, deep):
        chars = estimate_chars(candidate)
        assert isinstance(chars, int) and chars >= 0
        try:
            text = str(candidate)
        except Exception:
            continue
        assert chars == len(text)


# ----------------------------------------------------------------------------------------- the default estimate


def inputs(**values: Any) -> Any:
    """What an estimate reads of a call: its inputs."""
    return SimpleNamespace(inputs=values)


def test_the_default_estimate_is_the_characters_over_four_and_the_lms_max_tokens() -> None:
    """Prompt = (inputs + instructions + demos) / 4, integer division; completion = the context LM's max_tokens."""
    program = dspy.Predict("question -> answer")
    demo = dspy.Example(question="q", answer="a")
    program.demos = [demo]
    estimate = ProgramEstimate(program)
    prompt_chars = len(program.signature.instructions) + len(str(demo))
    with dspy.context(lm=FaultInjectingLM(max_tokens=77)):
        assert estimate.tokens(inputs(question="abcdefgh", n=1234)) == ((prompt_chars + 8 + 4) // 4, 77)
    with dspy.context(lm=None):
        assert estimate.tokens(inputs(question="")) == (prompt_chars // 4, DEFAULT_MAX_TOKENS)


def test_a_pinned_lm_sets_the_completion_and_the_model_whatever_the_context_says() -> None:
    program = dspy.Predict("question -> answer")
    program.lm = FaultInjectingLM("pinned", max_tokens=30)
    estimate = ProgramEstimate(program)
    with dspy.context(lm=FaultInjectingLM("context", max_tokens=500)):
        assert estimate.tokens(inputs(question="q"))[1] == 30
        assert estimate.model() == program.lm.model
    bare = ProgramEstimate(dspy.Predict("question -> answer"))
    with dspy.context(lm=FaultInjectingLM("context", max_tokens=500)):
        assert bare.tokens(inputs(question="q"))[1] == 500
        assert bare.model() == "custom/context"
    with dspy.context(lm=None):
        assert bare.model() == "unknown"


def test_an_estimate_learning_several_programs_keeps_the_largest_prompt_and_completion() -> None:
    """A layer built into two pipelines must not under-estimate either: the longer instructions, the larger
    pinned max_tokens, and the first pinned model are kept; learn() returns the program's pinned LMs."""
    short, long = dspy.Predict("question -> answer"), dspy.Predict("question -> answer")
    long.signature = long.signature.with_instructions("x" * 400)
    short.lm = FaultInjectingLM("first", max_tokens=10)
    long.lm = FaultInjectingLM("second", max_tokens=90)
    estimate = ProgramEstimate()
    assert estimate.learn(short) == [short.lm]
    assert estimate.learn(long) == [long.lm]
    assert estimate.learn(short) == [short.lm]
    assert estimate.tokens(inputs()) == (400 // 4, 90)
    assert estimate.model() == short.lm.model


async def test_the_budget_and_the_rate_limiter_make_the_same_default_estimate() -> None:
    """One estimate for both layers: the limiter charges prompt + completion, the budget reserves the same."""
    program = dspy.Predict("question -> answer")
    limiter = RateLimiter(Limit.tokens(10_000_000, per=60.0))
    budget = Budget(tokens=10_000_000)
    pipeline = Pipeline(program, limiter, budget)
    call = pipeline.new_call({"question": "What is DSPy?", "n": 1234})
    with dspy.context(lm=FaultInjectingLM(max_tokens=64)):
        shared = sum(ProgramEstimate(program).tokens(call))
        assert limiter.default_estimate(call) == sum(budget.estimate(call)) == shared
