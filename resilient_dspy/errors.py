"""The error taxonomy of resilient_dspy and the one place that classifies any exception.

Every error the library raises derives from :class:`ResilienceError`. Rejections (a layer refusing to run
the call) carry ``retry_after`` when the layer knows how long the refusal will last. :func:`classify` is the
single source of truth for "is this retryable, after how long, and is it a cancellation?".
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dspy

__all__ = [
    "MAX_RETRY_AFTER",
    "BudgetExceededError",
    "BulkheadFullError",
    "CircuitOpenError",
    "ConfigurationError",
    "ErrorInfo",
    "ErrorKind",
    "FallbackFailedError",
    "InvalidInputError",
    "InvalidOutputError",
    "RateLimitedError",
    "RejectedError",
    "RequestTooLargeError",
    "ResilienceError",
    "ResilienceWarning",
    "RetriesExhaustedError",
    "StreamInterruptedError",
    "ThrottledError",
    "TimeoutExceededError",
    "TruncatedOutputError",
    "classify",
]


class ResilienceError(Exception):
    """Base class of every error raised by resilient_dspy."""


class ResilienceWarning(UserWarning):
    """A configuration that works but will surprise you (e.g. DSPy retries under our Retry)."""


class ConfigurationError(ResilienceError, ValueError):
    """Invalid options or program, raised when the pipeline is built; lists every problem at once."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems)
        lines = "\n".join(f"  - {field}: {rule}" for field, rule in self.problems)
        count = len(self.problems)
        super().__init__(f"{count} invalid setting{'s' if count != 1 else ''}:\n{lines}")


class TimeoutExceededError(ResilienceError, TimeoutError):
    """Our own timeout fired: the call (``scope='total'``) or one attempt (``scope='attempt'``) ran too long; ``limit``
    says which: the ``deadline``, or for a streamed call the wait for its ``first_chunk`` or an ``idle`` pause."""

    def __init__(self, timeout: float, *, scope: str = "total", limit: str = "deadline") -> None:
        self.timeout = timeout
        self.scope = scope
        self.limit = limit
        waited = {"first_chunk": "no first chunk within", "idle": "no chunk for"}.get(limit)
        super().__init__(
            f"{scope} timeout: {waited} {timeout:g}s" if waited else f"{scope} timeout of {timeout:g}s exceeded"
        )


class StreamInterruptedError(ResilienceError):
    """A streamed call failed after ``chunks`` chunks reached the consumer: it is not retried and no fallback serves
    it, since a second answer would repeat or mix chunks. ``error`` is the failure (also ``__cause__``, which
    ``dspy.streamify`` drops when it re-raises)."""

    def __init__(self, chunks: int, error: BaseException) -> None:
        self.chunks = chunks
        self.error = error
        super().__init__(
            f"the stream failed after {chunks} chunk(s) reached the consumer: {type(error).__name__}: {error}"
        )
        self.__cause__ = error


class RetriesExhaustedError(ResilienceError):
    """Retry gave up; ``last_error`` (also ``__cause__``) is the final attempt's error."""

    def __init__(self, attempts: int, last_error: BaseException, *, reason: str = "max_attempts") -> None:
        self.attempts = attempts
        self.last_error = last_error
        self.reason = reason
        super().__init__(
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''} ({reason}): "
            f"{type(last_error).__name__}: {last_error}"
        )
        self.__cause__ = last_error


def format_seconds(seconds: float) -> str:
    """``3600s``, ``1.6s``, ``0.012s``: a duration in plain seconds for messages (never ``3.6e+03s``)."""
    if seconds >= 100 or seconds == int(seconds):
        return f"{seconds:.0f}s"
    digits = 3 if seconds < 1 else 2
    return f"{seconds:.{digits}f}".rstrip("0").rstrip(".") + "s"


class RejectedError(ResilienceError):
    """A layer refused to run the call; ``retry_after`` says when trying again may succeed, if known."""

    def __init__(self, message: str = "", *, retry_after: float | None = None) -> None:
        self.retry_after = retry_after
        suffix = f" (retry after {format_seconds(retry_after)})" if retry_after is not None else ""
        super().__init__(f"{message or type(self).__name__}{suffix}")


class CircuitOpenError(RejectedError):
    """The circuit breaker is open: the call was not run."""


class BulkheadFullError(RejectedError):
    """The bulkhead's slots and queue are full: the call was not run."""


class RateLimitedError(RejectedError):
    """The rate limiter could not admit the call within its ``max_wait``."""


class BudgetExceededError(RejectedError):
    """A token or cost budget is spent: the call was not run."""


class ThrottledError(RejectedError):
    """An adaptive throttle refused the call locally: the provider has been refusing too many (client-side
    throttling, as the SRE book describes it)."""


class RequestTooLargeError(ResilienceError, ValueError):
    """The call asks for more than a limit can ever grant (e.g. more tokens than the per-period limit)."""

    def __init__(self, field: str, rule: str) -> None:
        self.field = field
        self.rule = rule
        super().__init__(f"{field}: {rule}")


class InvalidInputError(ResilienceError, ValueError):
    """The call's inputs failed the Guard's checks, so the program was not run; not retryable.

    ``field`` and ``rule`` name the first problem, ``problems`` lists them all. An input check function may
    raise it itself to name the field.
    """

    def __init__(self, field: str, rule: str, *, problems: Sequence[tuple[str, str]] = ()) -> None:
        self.problems: tuple[tuple[str, str], ...] = tuple(problems) or ((field, rule),)
        self.field = field
        self.rule = rule
        super().__init__("; ".join(f"{name}: {why}" for name, why in self.problems))


class InvalidOutputError(ResilienceError):
    """The program answered, but the answer failed the Guard's output check; a fresh answer may pass.

    ``prediction`` is the rejected answer, ``reason`` why, ``field`` the output field at fault when known.
    """

    def __init__(self, reason: str, prediction: Any, *, field: str | None = None) -> None:
        self.reason = reason
        self.prediction = prediction
        self.field = field
        super().__init__(f"invalid output{'' if field is None else f' field {field!r}'}: {reason}")


class TruncatedOutputError(ResilienceError):
    """The LM stopped at its token limit (``finish_reason="length"``) and the cut answer did not parse.

    ``max_tokens`` is the limit it hit (None when unknown), ``model`` the LM; the parse error is ``__cause__``. Another
    attempt with the same limit is cut the same way, so Retry retries it only with a larger ``max_tokens``.
    """

    def __init__(self, max_tokens: int | None, *, model: str | None = None, lm_response: str = "") -> None:
        self.max_tokens = max_tokens
        self.model = model
        self.lm_response = lm_response
        limit = "its max_tokens" if max_tokens is None else f"max_tokens={max_tokens}"
        super().__init__(
            f"the answer of {model or 'the LM'} stopped at {limit} (finish_reason='length') and could not be parsed; "
            "give it room: a larger max_tokens on the LM (dspy.LM(..., max_tokens=...)), Retry(max_tokens_cap=...) "
            "to raise it on a retry, or a shorter prompt or fewer output fields"
        )


class FallbackFailedError(ResilienceError, ExceptionGroup):
    """Every alternative of a fallback chain failed; ``exceptions`` holds each error in the order tried."""

    def __new__(cls, message: str, exceptions: Sequence[Exception], tried: Sequence[str] = ()) -> FallbackFailedError:
        return super().__new__(cls, message, exceptions)

    def __init__(self, message: str, exceptions: Sequence[Exception], tried: Sequence[str] = ()) -> None:
        super().__init__(message, exceptions)
        self.tried: tuple[str, ...] = tuple(tried)

    def derive(self, excs: Sequence[Exception]) -> FallbackFailedError:  # type: ignore[override]
        """The subgroup ``except*`` splits off, keeping the names of the alternatives whose errors it holds."""
        kept = {id(e) for e in excs}
        names = [name for name, error in zip(self.tried, self.exceptions, strict=False) if id(error) in kept]
        return FallbackFailedError(self.message, excs, names)


class ErrorKind(StrEnum):
    """What an exception means for resilience decisions."""

    CANCELLED = "cancelled"
    RATE_LIMIT = "rate_limit"
    SERVER = "server"
    TIMEOUT = "timeout"
    TRANSPORT = "transport"
    PARSE = "parse"
    TRUNCATED = "truncated"
    """The answer stopped at ``max_tokens`` and did not parse: retried only with a larger limit."""
    REJECTED = "rejected"
    GAVE_UP = "gave_up"
    CLIENT = "client"
    USER_MISTAKE = "user_mistake"
    """A configuration or programming error (no LM configured, ``TypeError``, ``AttributeError``, our
    ``ConfigurationError``): never retried, never served by a default Fallback, neutral for a breaker."""
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The classification of one exception (see :func:`classify`)."""

    kind: ErrorKind
    retryable: bool
    retry_after: float | None = None
    needs_fresh_response: bool = False

    @property
    def cancellation(self) -> bool:
        return self.kind is ErrorKind.CANCELLED


MAX_RETRY_AFTER = 86_400.0
"""The longest ``retry_after`` :func:`classify` reports (one day): a larger value (1e12 s, an int past float range)
is a provider's bug, not a plan, and would otherwise stall a breaker or a scheduler for centuries."""

_RETRYABLE_STATUS = frozenset({200, 408, 409, 425, 429, 500, 502, 503, 504})  # 200: a body that did not parse


def _retry_after(error: BaseException) -> float | None:
    """The error's ``retry_after`` if a number >= 0 and finite, capped at :data:`MAX_RETRY_AFTER`; else None."""
    value: Any = getattr(error, "retry_after", None)
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if value > MAX_RETRY_AFTER:  # compared before float(): an int may be too large for one
        return MAX_RETRY_AFTER if isinstance(value, int) or math.isfinite(value) else None
    seconds = float(value)
    return seconds if seconds >= 0 else None  # NaN fails this test too


_Rule = tuple[ErrorInfo, bool]
"""A type's classification, and whether its ``retry_after`` attribute (read per instance) belongs in it."""


def _rule(is_a: Callable[[type[BaseException] | tuple[type[BaseException], ...]], bool]) -> _Rule | None:
    """The rules of :func:`classify`, first match wins; None where the answer depends on an attribute.

    ``is_a`` is ``isinstance`` on the error or ``issubclass`` on its type: one list of rules for both.
    """
    if is_a(asyncio.CancelledError):
        return ErrorInfo(ErrorKind.CANCELLED, retryable=False), False
    if not is_a(Exception):
        return ErrorInfo(ErrorKind.UNKNOWN, retryable=False), False
    if is_a(RejectedError):
        return ErrorInfo(ErrorKind.REJECTED, retryable=False), True
    if is_a((RequestTooLargeError, InvalidInputError)):
        return ErrorInfo(ErrorKind.CLIENT, retryable=False), False
    if is_a((ConfigurationError, TypeError, AttributeError)):
        return _USER_MISTAKE, False
    if is_a(TruncatedOutputError):
        return ErrorInfo(ErrorKind.TRUNCATED, retryable=True, needs_fresh_response=True), False
    if is_a(InvalidOutputError):
        return ErrorInfo(ErrorKind.PARSE, retryable=True, needs_fresh_response=True), False
    if is_a((RetriesExhaustedError, FallbackFailedError, StreamInterruptedError)):
        return ErrorInfo(ErrorKind.GAVE_UP, retryable=False), False
    if is_a(TimeoutExceededError):
        return None  # its scope decides
    if is_a(dspy.AdapterParseError):
        return ErrorInfo(ErrorKind.PARSE, retryable=True, needs_fresh_response=True), False
    if is_a(dspy.LMRateLimitError):
        return ErrorInfo(ErrorKind.RATE_LIMIT, retryable=True), True
    if is_a(dspy.LMServerError):
        return ErrorInfo(ErrorKind.SERVER, retryable=True), True
    if is_a(dspy.LMTimeoutError):
        return ErrorInfo(ErrorKind.TIMEOUT, retryable=True), True
    if is_a((dspy.LMTransportError, dspy.LMStreamAssemblyError)):  # a truncated stream is a dropped connection
        return ErrorInfo(ErrorKind.TRANSPORT, retryable=True), True
    if is_a((dspy.LMAuthError, dspy.LMBillingError, dspy.LMInvalidRequestError)):
        return ErrorInfo(ErrorKind.CLIENT, retryable=False), True
    if is_a(dspy.LMProviderError):
        return None  # its status decides
    if is_a(TimeoutError):
        return ErrorInfo(ErrorKind.TIMEOUT, retryable=True), True
    if is_a(ConnectionError):
        return ErrorInfo(ErrorKind.TRANSPORT, retryable=True), True
    if is_a(ValueError):
        return None  # DSPy's "no LM is loaded" is a plain ValueError: its message decides
    return ErrorInfo(ErrorKind.UNKNOWN, retryable=False), True


_USER_MISTAKE = ErrorInfo(ErrorKind.USER_MISTAKE, retryable=False)
_DSPY_SETUP_ERRORS = ("No LM is loaded", "LM must be")
"""How DSPy 3.4's ``Predict`` words its ``ValueError`` when no LM is configured (or a string was given for one)."""


_NO_RULE: Any = object()  # a dict.get default that no rule equals
_BY_TYPE: dict[type, _Rule | None] = {}
""":func:`_rule` per exception type, learnt on first sight (bounded by ``_MAX_TYPES``; beyond it, not cached)."""
_MAX_TYPES = 512


def _by_attributes(error: BaseException) -> ErrorInfo:
    """The rules that read the error itself: our timeout's scope, DSPy's no-LM ValueError's message, a generic
    provider error's status."""
    if isinstance(error, TimeoutExceededError):
        return ErrorInfo(ErrorKind.TIMEOUT, retryable=error.scope == "attempt")
    if isinstance(error, ValueError) and not isinstance(error, dspy.LMProviderError):
        message = str(error.args[0]) if error.args else ""
        if message.startswith(_DSPY_SETUP_ERRORS):
            return _USER_MISTAKE
        return ErrorInfo(ErrorKind.UNKNOWN, retryable=False, retry_after=_retry_after(error))
    retry_after = _retry_after(error)
    status = getattr(error, "status", None)
    if status in _RETRYABLE_STATUS:
        kind = ErrorKind.RATE_LIMIT if status == 429 else ErrorKind.SERVER
        return ErrorInfo(kind, retryable=True, retry_after=retry_after)
    return ErrorInfo(ErrorKind.CLIENT, retryable=False, retry_after=retry_after)


def classify(error: BaseException) -> ErrorInfo:
    """Classify any exception: retryable or not, its retry-after, whether it is a cancellation.

    Rules (first match wins): cancellation and other ``BaseException`` are never retried; our own
    rejections, give-ups and total timeouts are final; our attempt timeout is retryable; DSPy rate-limit,
    5xx, timeout and transport errors (a truncated stream included) are retryable; auth, billing,
    invalid-request and context-window errors are not; ``AdapterParseError`` is retryable only with a fresh
    (uncached) response, and so is a ``TruncatedOutputError`` (kind ``TRUNCATED``: Retry also raises its
    ``max_tokens``); configuration and programming errors (``ConfigurationError``, ``TypeError``, ``AttributeError``,
    DSPy's "No LM is loaded" ``ValueError``) are a ``USER_MISTAKE``; anything else fails closed. ``retry_after`` is
    capped at :data:`MAX_RETRY_AFTER`.

    The rules that depend on the type alone are decided once per exception type (every failed attempt
    classifies, and the ``isinstance`` chain costs ~2 µs); ``retry_after``, our timeout's scope and a provider
    error's status are read from each error.
    """
    cls = type(error)
    rule: _Rule | None
    if error.__class__ is cls:  # then isinstance(error, X) == issubclass(cls, X) for the plain classes above
        rule = _BY_TYPE.get(cls, _NO_RULE)
        if rule is _NO_RULE:
            rule = _rule(lambda types: issubclass(cls, types))
            if len(_BY_TYPE) < _MAX_TYPES:
                _BY_TYPE[cls] = rule
    else:
        rule = _rule(lambda types: isinstance(error, types))
    if rule is None:
        return _by_attributes(error)
    info, reads_retry_after = rule
    if reads_retry_after and getattr(error, "retry_after", None) is not None:
        retry_after = _retry_after(error)
        if retry_after is not None:
            return ErrorInfo(info.kind, info.retryable, retry_after, info.needs_fresh_response)
    return info
