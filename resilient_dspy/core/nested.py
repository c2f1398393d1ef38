"""A pipeline as the program of another pipeline: the target that runs it, handing down the caller's deadline,
properties and partition key, and taking its record back (attempts, retries, who served).

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from resilient_dspy.binding.shape import KeyIdentity, NestedIdentity
from resilient_dspy.core.call import Call

if TYPE_CHECKING:
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["PipelineTarget"]


class PipelineTarget:
    """Runs a nested :class:`~resilient_dspy.Pipeline`, handing down the caller's deadline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.name = pipeline.name
        self.input_fields = pipeline.input_fields
        self.output_fields: tuple[str, ...] | None = getattr(pipeline.target, "output_fields", None)
        self._identity = NestedIdentity(pipeline.target.key_identity)

    def watch_dspy_retries(self) -> None:
        self.pipeline.target.watch_dspy_retries()

    def key_identity(self) -> KeyIdentity:
        """The identity of the target the nested pipeline runs, tagged ``"pipeline"``."""
        return self._identity()

    def answer_annotations(self) -> tuple[Any, ...]:
        return self.pipeline.target.answer_annotations()

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        return self.pipeline.target.input_problems(inputs)

    async def __call__(self, call: Call) -> Any:
        nested = self.pipeline.new_call(
            call.inputs,
            deadline=call.deadline,
            properties=call.properties,
            partition_key=call.partition_key,
            bypass_cache=call.bypass_cache,
        )
        try:
            return await self.pipeline.run(nested)
        finally:
            call.record.absorb(nested.record)

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name, "pipeline": self.pipeline.describe()}
