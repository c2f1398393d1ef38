"""The core: the one contract layers are written against (:mod:`.call`), the pipeline that composes them, and the
clock, options, health and trace every layer shares. See docs/architecture.md.

A layer's author imports from here: the contract (:class:`Call`, :class:`Handler`, :class:`Middleware`, ...), the
:class:`Layer` base, the clock, the options model and the health types. The pipeline is imported from the root.
"""

from resilient_dspy.core.call import (
    Call,
    CallRecord,
    Handler,
    Lease,
    Middleware,
    Runtime,
    leases_lent,
    lend_leases,
    reclaim_leases,
)
from resilient_dspy.core.clock import Clock, DeadlineScope, LoopClock
from resilient_dspy.core.health import LayerHealth, PipelineHealth, Status, worst
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import FieldProblem, Options, build_options, options_from
from resilient_dspy.core.trace import Span, Trace

__all__ = [
    "Call",
    "CallRecord",
    "Clock",
    "DeadlineScope",
    "FieldProblem",
    "Handler",
    "Layer",
    "LayerHealth",
    "Lease",
    "LoopClock",
    "Middleware",
    "Options",
    "PipelineHealth",
    "Runtime",
    "Span",
    "Status",
    "Trace",
    "build_options",
    "leases_lent",
    "lend_leases",
    "options_from",
    "reclaim_leases",
    "roles",
    "worst",
]
