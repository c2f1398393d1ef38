"""Token estimates made before a call, shared by the layers that must decide before the LM answers.

``RateLimiter`` (token limits) and ``Budget`` both charge an estimate first and reconcile with the measured usage
after: (characters of the inputs + the program's instructions and demos) / 4 for the prompt, plus the LM's
``max_tokens`` for the completion.
"""

from __future__ import annotations

from typing import Any

import dspy

__all__ = ["DEFAULT_MAX_TOKENS", "lm_max_tokens", "program_parts"]

DEFAULT_MAX_TOKENS = 1024
"""The completion estimate when the LM sets no ``max_tokens``."""


def lm_max_tokens(lm: Any) -> int | None:
    """The ``max_tokens`` (or ``max_completion_tokens``) an LM was built with, if a positive int."""
    kwargs = getattr(lm, "kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    value = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def program_parts(program: Any) -> tuple[int, list[Any]]:
    """Characters of the instructions and demos of ``program``'s predictors, and the LMs pinned on them."""
    from resilient_dspy.pipeline import Pipeline

    while isinstance(program, Pipeline):
        program = program.program
    if isinstance(program, dspy.BaseLM):
        return 0, [program]
    if not isinstance(program, dspy.Module):
        return 0, []
    chars, lms = 0, []
    for predictor in program.predictors():
        signature = getattr(predictor, "signature", None)
        chars += len(getattr(signature, "instructions", "") or "")
        chars += sum(len(str(demo)) for demo in getattr(predictor, "demos", ()) or ())
        if getattr(predictor, "lm", None) is not None:
            lms.append(predictor.lm)
    return chars, lms
