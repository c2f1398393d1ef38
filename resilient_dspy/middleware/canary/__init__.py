"""Canary: send a share of calls to candidate programs or LMs beside the stable one, roll a worse one back.

Weighted routing: each call goes to stable (the layers below, i.e. the wrapped program) or to one candidate
(``UseLM``: the same stack under another LM; ``UseProgram``: another program or a nested Pipeline), drawn from the
injected ``rng`` (the pipeline's by default), or by a stable hash of ``sticky(call)`` so the same key keeps its route
while the weights hold. Each route keeps a window of judged outcomes (the last ``window`` calls that reached the
program; a cache hit or an inner rejection judges nothing); once both hold ``min_calls``, a candidate whose error
rate exceeds stable's by more than ``max_error_rate_increase``, or whose latency percentile exceeds stable's times
``max_latency_ratio``, is rolled back: its calls go to stable, with a ``CanaryRolledBack`` event and a warning.
``promote()`` / ``rollback()`` decide by hand. In canary mode a candidate's error is the caller's (canary traffic is
real traffic: a Fallback above may serve it); a user mistake (``TypeError``, ``ConfigurationError``) counts as the
candidate's error and is raised, never hidden. In shadow mode the caller always gets stable's answer or error; a copy
runs on the candidate in a task the Canary owns (at most ``max_shadows`` in flight, more skipped and counted; each
ends within ``shadow_timeout``; cancelled with its caller; ``aclose()`` cancels the rest): its answer and errors never
reach the caller, its outcome is judged and reported (``ShadowCompared``; ``compare=`` says whether answers match),
and a user mistake in it is logged at error level once per type. ``Outcome.served_by`` names the candidate that
served. See docs/patterns/canary.md.
"""

from resilient_dspy.middleware.canary.events import (
    CanaryPromoted,
    CanaryRolledBack,
    CanaryRouted,
    CanarySnapshot,
    CandidateSnapshot,
    RouteStats,
    ShadowCompared,
    ShadowSkipped,
)
from resilient_dspy.middleware.canary.layer import STABLE, Canary
from resilient_dspy.middleware.canary.options import CanaryOptions
from resilient_dspy.middleware.canary.shadow import SHADOW_PROPERTY

__all__ = [
    "SHADOW_PROPERTY",
    "STABLE",
    "Canary",
    "CanaryOptions",
    "CanaryPromoted",
    "CanaryRolledBack",
    "CanaryRouted",
    "CanarySnapshot",
    "CandidateSnapshot",
    "RouteStats",
    "ShadowCompared",
    "ShadowSkipped",
]
