"""The shared fault vocabulary: what one LM request does (:class:`Fault`), a scripted step, and the error a DSPy
program's caller sees for each fault, as DSPy maps it.

Used alike by the ``Chaos`` middleware and the test kit (``resilient_dspy.testing``), so the library never imports
the test kit (docs/architecture.md).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dspy

from resilient_dspy.errors import ConfigurationError, TruncatedOutputError

__all__ = [
    "FAULT_STATUS",
    "MALFORMED_TEXT",
    "Fault",
    "FaultStep",
    "ScriptEntry",
    "fault_error",
    "parse_steps",
    "truncate_answer",
]


class Fault(StrEnum):
    """What one LM request does; the vocabulary shared by FaultInjectingLM, Chaos and the chaos server."""

    OK = "ok"
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    TRANSPORT = "transport"
    HANG = "hang"
    MALFORMED = "malformed"
    TRUNCATED = "truncated"
    INVALID_JSON = "invalid_json"
    CONTEXT_WINDOW = "context_window"
    AUTH = "auth"


FAULT_STATUS = {  # the HTTP status an HTTP provider sends with each fault
    Fault.RATE_LIMIT: 429,
    Fault.SERVER_ERROR: 503,
    Fault.TIMEOUT: 504,
    Fault.INVALID_JSON: 200,
    Fault.CONTEXT_WINDOW: 400,
    Fault.AUTH: 401,
}


def _step_problems(fault: Fault, latency: Any, retry_after: Any, status: Any) -> list[tuple[str, str]]:
    problems = []
    for name, value in (("latency", latency), ("retry_after", retry_after)):
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0
        ):
            problems.append((name, f"must be a finite number of seconds >= 0 (got {value!r})"))
    if retry_after is not None and fault is not Fault.RATE_LIMIT:
        problems.append(("retry_after", f"only a rate_limit carries a Retry-After (fault is {fault.value})"))
    if status is not None:
        if fault is not Fault.SERVER_ERROR:
            problems.append(("status", f"only a server_error takes a status (fault is {fault.value})"))
        elif isinstance(status, bool) or not isinstance(status, int) or not 500 <= status <= 599:
            problems.append(("status", f"must be an HTTP status from 500 to 599 (got {status!r})"))
    return problems


@dataclass(frozen=True, slots=True)
class FaultStep:
    """One scripted request: its fault and, optionally, its own latency, Retry-After (rate_limit) or status (5xx)."""

    fault: Fault = Fault.OK
    latency: float | None = None
    retry_after: float | None = None
    status: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.fault, Fault):
            known = [kind.value for kind in Fault]
            if self.fault not in known:
                rule = f"unknown fault {self.fault!r}; known: {', '.join(known)}"
                raise ConfigurationError([("FaultStep.fault", rule)])
            object.__setattr__(self, "fault", Fault(self.fault))
        problems = _step_problems(self.fault, self.latency, self.retry_after, self.status)
        if problems:
            raise ConfigurationError([(f"FaultStep.{name}", rule) for name, rule in problems])


ScriptEntry = Fault | str | FaultStep | Mapping[str, Any] | None
"""A script entry: a fault or its name, None (= ok), a FaultStep, or a FaultStep as a mapping (from JSON)."""


def parse_steps(entries: Iterable[ScriptEntry], field: str) -> list[FaultStep]:
    """Script entries as FaultSteps, all or none: every problem is reported at once as a ConfigurationError."""
    entries = list(entries)
    known = [kind.value for kind in Fault]
    unknown: list[Any] = []
    problems: list[tuple[str, str]] = []
    steps: list[FaultStep] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, FaultStep):
            steps.append(entry)
            continue
        values: dict[str, Any]
        if entry is None:
            values = {}
        elif isinstance(entry, Fault | str):
            values = {"fault": entry}
        elif isinstance(entry, Mapping):
            values = dict(entry)
        else:
            rule = f"must be a fault name, None, a FaultStep or a mapping (got {entry!r})"
            problems.append((f"{field}[{index}]", rule))
            continue
        extra = sorted(set(values) - {"fault", "latency", "retry_after", "status"})
        if extra:
            rule = f"unknown key(s) {extra}; known: fault, latency, retry_after, status"
            problems.append((f"{field}[{index}]", rule))
            continue
        name = values.get("fault", Fault.OK)
        name = Fault.OK if name is None else name
        if not isinstance(name, Fault) and name not in known:
            unknown.append(name)
            continue
        fault = Fault(name)
        step_problems = _step_problems(fault, values.get("latency"), values.get("retry_after"), values.get("status"))
        if step_problems:
            problems.extend((f"{field}[{index}].{key}", rule) for key, rule in step_problems)
            continue
        steps.append(FaultStep(fault, values.get("latency"), values.get("retry_after"), values.get("status")))
    if unknown:
        problems.insert(0, (field, f"unknown fault(s) {unknown}; known: {', '.join(known)}"))
    if problems:
        raise ConfigurationError(problems)
    return steps


MALFORMED_TEXT = "Sorry, I lost the format: the answer is somewhere around here."


def truncate_answer(text: str) -> str:
    """``text`` as a model cut by its token limit sends it: it stops before its last field (a Chat header, a JSON key),
    so even DSPy's JSON repair finds that field missing and raises ``AdapterParseError``."""
    header = text.rfind("[[ ## ", 0, text.rfind("[[ ## completed ## ]]"))
    if header >= 0:
        return (text[:header] + "Let me think about this step by step, starting from the").lstrip()
    key = text.rfind('"', 0, text.rfind('":'))
    return text[: max(key, 0)] + '"reason'  # an unfinished key: json_repair drops it


_DSPY_ERRORS: dict[Fault, Callable[..., Exception]] = {
    Fault.RATE_LIMIT: dspy.LMRateLimitError,
    Fault.SERVER_ERROR: dspy.LMServerError,
    Fault.TIMEOUT: dspy.LMTimeoutError,
    Fault.TRANSPORT: dspy.LMTransportError,
    Fault.CONTEXT_WINDOW: dspy.ContextWindowExceededError,
    Fault.AUTH: dspy.LMAuthError,
    Fault.INVALID_JSON: dspy.LMProviderError,
}
_MESSAGES = {
    Fault.TRANSPORT: "server closed connection before sending response",
    Fault.INVALID_JSON: "the reply (HTTP 200) is not JSON",
}


def fault_error(
    fault: Fault | str,
    *,
    retry_after: float | None = None,
    status: int | None = None,
    model: str = "chaos",
    signature: Any = None,
) -> Exception | None:
    """The error a DSPy program's caller sees for ``fault`` (as DSPy maps it), or None for ok and hang.

    ``malformed`` is the ``AdapterParseError`` of ``signature`` (default ``question -> answer``), ``truncated`` the
    ``TruncatedOutputError`` a pipeline raises for an answer cut at ``max_tokens``; the others are
    DSPy's ``LMError`` classes with the status an HTTP provider would send.
    """
    fault = Fault(fault)
    if fault is Fault.TRUNCATED:
        return TruncatedOutputError(None, model=model)
    if fault is Fault.MALFORMED:
        signature = signature if signature is not None else dspy.Signature("question -> answer")
        parse_error: Exception = dspy.AdapterParseError(
            "ChatAdapter", signature, MALFORMED_TEXT, message=f"injected {fault.value}"
        )
        return parse_error
    make = _DSPY_ERRORS.get(fault)
    if make is None:
        return None
    message = f"injected {fault.value}: {_MESSAGES.get(fault, '')}".rstrip(": ")
    status = status if status is not None else FAULT_STATUS.get(fault)
    error: Exception = make(
        message=message, model=model, status=status, retry_after=retry_after if fault is Fault.RATE_LIMIT else None
    )
    return error
