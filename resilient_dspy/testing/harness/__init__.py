"""The chaos harness: run many calls through a pipeline and record what the invariants need.

``run_calls`` (``runner``) runs the calls and records results, timings and events (``records``); a
``ScriptedProgram`` (``program``) is a fast program that follows a fault script; a ``Checkpoint`` (``checkpoint``)
journals what a layer let through; a ``StackConfig`` (``stack``) builds a pipeline with checkpoints in place;
``input_values`` (``inputs``) fills every input field of a program.
"""

from resilient_dspy.testing.harness.checkpoint import Checkpoint
from resilient_dspy.testing.harness.inputs import input_values
from resilient_dspy.testing.harness.program import ScriptedProgram
from resilient_dspy.testing.harness.records import (
    CallResult,
    EventRecorder,
    ProgramEntry,
    RecordedEvent,
    Run,
    current_call,
    current_recorder,
)
from resilient_dspy.testing.harness.runner import run_calls
from resilient_dspy.testing.harness.stack import Built, StackConfig

__all__ = [
    "Built",
    "CallResult",
    "Checkpoint",
    "EventRecorder",
    "ProgramEntry",
    "RecordedEvent",
    "Run",
    "ScriptedProgram",
    "StackConfig",
    "current_call",
    "current_recorder",
    "input_values",
    "run_calls",
]
