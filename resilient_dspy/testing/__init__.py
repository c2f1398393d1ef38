"""Tools for testing pipelines: the fault vocabulary, the fault-injecting LM, the chaos HTTP server, the chaos
harness and its invariant checkers (hypothesis strategies live in ``resilient_dspy.testing.strategies``).

Everything but the fault LM is imported on first use, so importing this package loads neither ``aiohttp.web`` nor
the middleware (which itself imports the fault vocabulary from here).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from resilient_dspy.testing.fault_lm import (
    Fault,
    FaultInjectingLM,
    FaultProfile,
    FaultStep,
    JournalEntry,
    fault_error,
)

if TYPE_CHECKING:
    from resilient_dspy.testing.chaos_server import ChaosServer, Quota, StreamFault, StreamStep
    from resilient_dspy.testing.harness import CallResult, Checkpoint, Run, ScriptedProgram, StackConfig, run_calls
    from resilient_dspy.testing.invariants import Violation, assert_no_violations, check_built, check_run
    from resilient_dspy.testing.plugin import ChaosHarness, ManualClock

__all__ = [
    "CallResult",
    "ChaosHarness",
    "ChaosServer",
    "Checkpoint",
    "Fault",
    "FaultInjectingLM",
    "FaultProfile",
    "FaultStep",
    "JournalEntry",
    "ManualClock",
    "Quota",
    "Run",
    "ScriptedProgram",
    "StackConfig",
    "StreamFault",
    "StreamStep",
    "Violation",
    "assert_no_violations",
    "check_built",
    "check_run",
    "fault_error",
    "run_calls",
]

_LAZY = {
    "ChaosServer": "chaos_server",
    "Quota": "chaos_server",
    "StreamFault": "chaos_server",
    "StreamStep": "chaos_server",
    "CallResult": "harness",
    "Checkpoint": "harness",
    "Run": "harness",
    "ScriptedProgram": "harness",
    "StackConfig": "harness",
    "run_calls": "harness",
    "Violation": "invariants",
    "assert_no_violations": "invariants",
    "check_built": "invariants",
    "check_run": "invariants",
    "ChaosHarness": "plugin",
    "ManualClock": "plugin",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"resilient_dspy.testing.{module}"), name)
