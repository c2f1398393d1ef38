"""A fault-injecting DSPy LM: a real ``dspy.LM`` whose custom engine answers locally or fails on purpose.

Faults are raised as ``dspy.lm15`` errors, so DSPy's own error mapping turns them into ``LMRateLimitError``
(with ``retry_after``), ``LMServerError`` and friends exactly as for an HTTP provider. Answers follow the
adapter's format for the signature it is asked (Chat or JSON), report token usage, and are deterministic
per question. Faults come from an exact ``script`` first, then from a seeded random ``FaultProfile``.

The fault vocabulary (:class:`Fault`, :class:`FaultStep`, :func:`fault_error`) lives in :mod:`resilient_dspy.faults`,
shared with the ``Chaos`` middleware; the profile and the schedule that draws from it (``schedule``) and the answer
renderer (``answers``) are shared with the chaos HTTP server; the LM itself is in ``lm``.
"""

from resilient_dspy.faults import Fault, FaultStep, ScriptEntry, fault_error, parse_steps
from resilient_dspy.testing.fault_lm.answers import Answers, RenderedAnswer, render_answer
from resilient_dspy.testing.fault_lm.lm import FaultInjectingLM
from resilient_dspy.testing.fault_lm.schedule import (
    CANCELLED_BY_CALLER,
    Drawn,
    FaultProfile,
    FaultSchedule,
    JournalEntry,
)

__all__ = [
    "CANCELLED_BY_CALLER",
    "Answers",
    "Drawn",
    "Fault",
    "FaultInjectingLM",
    "FaultProfile",
    "FaultSchedule",
    "FaultStep",
    "JournalEntry",
    "RenderedAnswer",
    "ScriptEntry",
    "fault_error",
    "parse_steps",
    "render_answer",
]
