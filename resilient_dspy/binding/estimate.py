"""Token estimates made before a call, shared by the layers that must decide before the LM answers.

``RateLimiter`` (token limits) and ``Budget`` both charge an estimate first and reconcile with the measured usage
after. The default estimate, :class:`ProgramEstimate`, is written here once: (characters of the inputs + the
program's instructions and demos) / 4 for the prompt, plus the LM's ``max_tokens`` for the completion.

An input is measured as ``str(value)``. One that cannot be printed never fails the call: a structure too deep for
``str()`` (a list nested 100,000 deep) is counted without recursion, and a value whose ``str()`` raises counts
:data:`UNMEASURED_CHARS`, a bounded, conservative stand-in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import dspy

from resilient_dspy.binding.settings import setting

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "UNMEASURED_CHARS",
    "ProgramEstimate",
    "estimate_chars",
    "lm_max_tokens",
    "measure_chars",
    "program_parts",
]

DEFAULT_MAX_TOKENS = 1024
"""The completion estimate when the LM sets no ``max_tokens``."""


UNMEASURED_CHARS = 4 * DEFAULT_MAX_TOKENS
"""Characters the estimates assume for a value whose ``str()`` raises (as many tokens as a default completion)."""

_MAX_PARTS = 1_000_000
"""Most containers and items counted in one value without ``str()``: a bound on the time a pathological input costs."""

_OPEN_CLOSE: dict[type, tuple[int, int]] = {list: (1, 1), tuple: (1, 1), dict: (1, 1), set: (1, 1), frozenset: (11, 2)}
"""Characters of the brackets around a non-empty container of each type (``frozenset({...})``)."""


def measure_chars(value: Any) -> int | None:
    """Characters of ``str(value)``, counted without recursion when too deep for ``str()``; None if unprintable."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(str(value))
    except Exception:  # RecursionError from deep nesting, or the value's own __str__ raising
        return _count(value, None)


def estimate_chars(value: Any) -> int:
    """Like :func:`measure_chars`, but never None: each part that cannot be printed counts ``UNMEASURED_CHARS``."""
    if isinstance(value, str):
        return len(value)
    try:
        return len(str(value))
    except Exception:
        chars = _count(value, UNMEASURED_CHARS)
        return UNMEASURED_CHARS if chars is None else chars


def _count(value: Any, unmeasured: int | None) -> int | None:
    """The length of ``str(value)`` by walking lists, tuples, dicts and sets with a stack, not recursion.

    Items are counted as their ``repr()`` (as ``str()`` of a container shows them). A part whose text raises, and
    the rest of a value past ``_MAX_PARTS``, count ``unmeasured`` each, or make the answer None when it is None.
    """
    chars = 0
    parts = 0
    pending: list[Any] = [value]
    top = True
    while pending:
        item = pending.pop()
        parts += 1
        if parts > _MAX_PARTS:
            return None if unmeasured is None else chars + unmeasured
        kind = type(item)
        brackets = _OPEN_CLOSE.get(kind)
        if brackets is None:
            try:
                chars += len(str(item) if top else repr(item))
            except Exception:
                if unmeasured is None:
                    return None
                chars += unmeasured
        elif not item:
            chars += len(repr(item))
        else:
            size = len(item)
            chars += sum(brackets) + 2 * (size - 1)  # brackets, and ", " between items
            if kind is dict:
                chars += 2 * size  # ": " in each entry
                for key, entry in item.items():
                    pending.append(key)
                    pending.append(entry)
            else:
                if kind is tuple and size == 1:
                    chars += 1  # "(x,)"
                pending.extend(item)
        top = False
    return chars


def lm_max_tokens(lm: Any) -> int | None:
    """The ``max_tokens`` (or ``max_completion_tokens``) an LM was built with, if a positive int."""
    kwargs = getattr(lm, "kwargs", None)
    if not isinstance(kwargs, dict):
        return None
    value = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens")
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def program_parts(program: Any) -> tuple[int, list[Any]]:
    """Characters of the instructions and demos of ``program``'s predictors, and the LMs pinned on them (give it
    the program inside a Pipeline: :func:`resilient_dspy.core.pipeline.innermost_program`)."""
    if isinstance(program, dspy.BaseLM):
        return 0, [program]
    if not isinstance(program, dspy.Module):
        return 0, []
    chars, lms = 0, []
    for predictor in program.predictors():
        signature = getattr(predictor, "signature", None)
        chars += len(getattr(signature, "instructions", "") or "")
        chars += sum(estimate_chars(demo) for demo in getattr(predictor, "demos", ()) or ())
        if getattr(predictor, "lm", None) is not None:
            lms.append(predictor.lm)
    return chars, lms


class HasInputs(Protocol):
    """What an estimate reads of a call: its inputs (a :class:`~resilient_dspy.core.call.Call` has them)."""

    @property
    def inputs(self) -> Mapping[str, Any]: ...


class ProgramEstimate:
    """The default token estimate of the program a layer is built around: learned from the program once (walking
    its predictors per call would be slow), then ``tokens(call)`` per call, with no I/O.

    ``prompt_chars`` counts the instructions and demos, ``pinned_max_tokens`` the largest completion of an LM pinned
    on a predictor, ``pinned_model`` the first pinned LM's model (what runs, whatever ``dspy.context`` says). A layer
    built into several pipelines learns each program and keeps the largest, so no pipeline is under-estimated.
    """

    __slots__ = ("pinned_max_tokens", "pinned_model", "prompt_chars")

    def __init__(self, program: Any = None) -> None:
        self.prompt_chars = 0
        self.pinned_max_tokens: int | None = None
        self.pinned_model: str | None = None
        if program is not None:
            self.learn(program)

    def learn(self, program: Any) -> list[Any]:
        """Take in ``program`` (unwrapped from its Pipeline: ``innermost_program``); return the LMs pinned on it."""
        chars, lms = program_parts(program)
        self.prompt_chars = max(self.prompt_chars, chars)
        if lms:
            pinned = [lm_max_tokens(lm) or DEFAULT_MAX_TOKENS for lm in lms]
            self.pinned_max_tokens = max(self.pinned_max_tokens or 0, *pinned)
            self.pinned_model = self.pinned_model or getattr(lms[0], "model", None)
        return lms

    def tokens(self, call: HasInputs) -> tuple[int, int]:
        """``(prompt, completion)``: (characters of the inputs + instructions and demos) / 4, and the ``max_tokens``
        of a pinned LM, else of the LM in effect (``dspy.context``, ``dspy.configure``), else the default 1024."""
        chars = self.prompt_chars
        for value in call.inputs.values():
            chars += len(value) if isinstance(value, str) else estimate_chars(value)
        return chars // 4, self.pinned_max_tokens or lm_max_tokens(setting("lm")) or DEFAULT_MAX_TOKENS

    def model(self) -> str:
        """The model a call is expected to run on, to price its estimate: a pinned LM's, else the one in effect."""
        return self.pinned_model or getattr(setting("lm"), "model", None) or "unknown"
