"""Token estimates made before a call: any input, however odd, gets a bounded estimate and never fails the call."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Budget, Limit, Pipeline, RateLimiter
from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS, UNMEASURED_CHARS, estimate_chars


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
