"""The harness gives a program every input field its signature declares, each of its declared type."""

from __future__ import annotations

from typing import Any, Literal

import dspy
from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline
from resilient_dspy.testing.harness import input_values

TYPES: list[tuple[Any, type | tuple[type, ...]]] = [
    (str, str),
    (int, int),
    (float, float),
    (bool, bool),
    (list[str], list),
    (Literal["low", "high"], str),
    (str | None, str),
]


@settings(max_examples=25, deadline=None)
@given(
    fields=st.dictionaries(
        st.from_regex(r"[a-z][a-z_]{0,8}", fullmatch=True).filter(lambda n: n not in {"answer", "question"}),
        st.sampled_from(range(len(TYPES))),
        max_size=4,
    ),
    index=st.integers(0, 50),
)
def test_every_declared_input_gets_a_value_of_its_type(fields: dict[str, int], index: int) -> None:
    """Any signature `question, <fields...> -> answer`: every input is filled, the question in the first."""
    spec: dict[str, Any] = {"question": (str, dspy.InputField())}
    spec |= {name: (TYPES[kind][0], dspy.InputField()) for name, kind in fields.items()}
    spec["answer"] = (str, dspy.OutputField())
    pipeline = Pipeline(dspy.Predict(dspy.Signature(spec)))
    values = input_values(pipeline, "Why?", index)
    assert set(values) == {"question", *fields}
    assert values["question"] == "Why?"
    for name, kind in fields.items():
        assert isinstance(values[name], TYPES[kind][1]), (name, TYPES[kind][0], values[name])
