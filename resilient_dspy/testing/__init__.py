"""Tools for testing pipelines: the fault vocabulary, the fault-injecting LM, and the chaos HTTP server.

``ChaosServer`` and ``Quota`` are imported on first use, so importing this package does not load ``aiohttp.web``.
"""

from __future__ import annotations

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
    from resilient_dspy.testing.chaos_server import ChaosServer, Quota

__all__ = [
    "ChaosServer",
    "Fault",
    "FaultInjectingLM",
    "FaultProfile",
    "FaultStep",
    "JournalEntry",
    "Quota",
    "fault_error",
]

_LAZY = {"ChaosServer", "Quota"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from resilient_dspy.testing import chaos_server

        return getattr(chaos_server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
