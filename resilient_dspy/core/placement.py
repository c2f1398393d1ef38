"""The layer-order rules a pipeline checks when it is built: each layer takes part through its class's
``placement`` ("retry", "fallback", "canary" or "timeout"), so the core reads the stack without importing a layer.

See docs/concepts/order-of-layers.md and docs/architecture.md.
"""

from __future__ import annotations

import warnings

from resilient_dspy.core.call import Middleware
from resilient_dspy.errors import ResilienceWarning

__all__ = ["warn_about_order"]


def warn_about_order(layers: tuple[Middleware, ...]) -> None:
    """Warn (ResilienceWarning, once per mistake) about the documented order mistakes; they work, but surprise.

    Retry outside Fallback (a fallback answer is a success: never retried); Canary inside Retry (each attempt routed
    afresh); an attempt Timeout longer than the total one (clamped to it: nothing left to retry with); an attempt
    Timeout with no total one (attempts x seconds plus every sleep). See docs/concepts/order-of-layers.md. A layer
    takes part through its class's ``placement`` ("retry", "fallback", "canary" or "timeout", the last with
    ``options.seconds``): the core never imports a layer.
    """
    roles = [getattr(type(layer), "placement", None) for layer in layers]
    retries = [i for i, role in enumerate(roles) if role == "retry"]
    if not retries:
        return
    first_retry = retries[0]
    rules: list[str] = []
    if "fallback" in roles[first_retry:]:
        rules.append(
            "Retry is listed outside (before) Fallback: the fallback's answer is a success, so the Retry never "
            "retries and the first hiccup serves the fallback. List Fallback first (outermost)."
        )
    if "canary" in roles[first_retry:]:
        rules.append(
            "Canary is listed inside (after) Retry: each attempt is routed afresh, so one call's attempts mix routes "
            "and a failed candidate attempt is retried on stable. List Canary before the Retry (after Fallback)."
        )
    timeouts = [(i, layer.options.seconds) for i, layer in enumerate(layers) if roles[i] == "timeout"]  # type: ignore[attr-defined]
    totals = [seconds for i, seconds in timeouts if i < first_retry]
    attempts = [seconds for i, seconds in timeouts if i >= first_retry]
    if attempts and not totals:
        rules.append(
            f"Timeout({attempts[0]:g}) bounds each attempt, but no Timeout above the Retry bounds the total: the call "
            "can take every attempt's timeout plus every backoff sleep. Add a total Timeout before the Retry "
            "(unless a pipeline around this one sets a deadline)."
        )
    elif attempts and max(attempts) > min(totals):
        rules.append(
            f"the attempt Timeout({max(attempts):g}) is longer than the total Timeout({min(totals):g}): the attempt is "
            "clamped to the total deadline, so one slow attempt uses it all and is never retried. Make the attempt "
            "timeout a fraction of the total."
        )
    for rule in rules:
        warnings.warn(f"layer order: {rule}", ResilienceWarning, stacklevel=4)
