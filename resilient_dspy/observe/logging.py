"""Structured logging: one record per event, one per call (with its inputs), JSON lines, all redacted.

:class:`LoggingListener` turns each :class:`~resilient_dspy.Event` into a log record whose ``extra`` holds the
event name and every field (exceptions as ``{"type", "message"}``). :class:`LogCalls` is a middleware that logs
each call once it ends: outcome, duration, attempts, who served it, and its inputs. :class:`JsonFormatter`
writes any record, extras included, as one JSON object per line. Everything passes through a :class:`Redactor`.
"""

from __future__ import annotations

import datetime
import json
import logging
from collections.abc import Mapping
from typing import Any

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware.breaker.events import CircuitStateChanged
from resilient_dspy.middleware.bulkhead import BulkheadAcquired, BulkheadQueued
from resilient_dspy.middleware.cache.events import CacheBackendFailed, CacheCoalesced, CacheHit, CacheMiss, CacheStored
from resilient_dspy.middleware.fallback import FallbackUsed
from resilient_dspy.middleware.ratelimit.events import RateLimitReconciled
from resilient_dspy.middleware.retry import RetryGaveUp
from resilient_dspy.middleware.timeout import TimeoutFired
from resilient_dspy.observe.common import event_fields, report_call, safely
from resilient_dspy.observe.redact import Redactor, to_plain

__all__ = ["DEFAULT_LEVELS", "JsonFormatter", "LogCalls", "LoggingListener", "RedactingFilter"]

LevelKey = type[Event] | str
"""An event type (its subclasses included) or, as before, an event class's name."""

DEFAULT_LEVELS: Mapping[type[Event], int] = {
    RetryGaveUp: logging.WARNING,
    TimeoutFired: logging.WARNING,
    FallbackUsed: logging.WARNING,
    CircuitStateChanged: logging.WARNING,
    Rejected: logging.WARNING,  # every refusal, of any layer: breaker, bulkhead, limiter, budget, guard, yours
    CacheBackendFailed: logging.WARNING,
    CacheHit: logging.DEBUG,
    CacheMiss: logging.DEBUG,
    CacheStored: logging.DEBUG,
    CacheCoalesced: logging.DEBUG,
    BulkheadQueued: logging.DEBUG,
    BulkheadAcquired: logging.DEBUG,
    RateLimitReconciled: logging.DEBUG,
}
"""Per-event levels used when ``levels`` is not given, by type (subclasses included); other events log at the
listener's ``level``."""

_DEFAULT_REDACTOR = Redactor()

_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}
_RESERVED = _RECORD_ATTRIBUTES | {"time", "timestamp", "level", "logger", "exception"}


def _extra(fields: Mapping[str, Any]) -> dict[str, Any]:
    """Fields as ``extra``: a name a LogRecord (or the JSON envelope) already uses gets an ``event_`` prefix."""
    return {(f"event_{name}" if name in _RESERVED else name): value for name, value in fields.items()}


def _summary(fields: Mapping[str, Any]) -> str:
    parts = []
    for name, value in fields.items():
        if name == "event" or value is None:
            continue
        if isinstance(value, dict) and set(value) == {"type", "message"}:
            value = f"{value['type']}({value['message']!r})"
        parts.append(f"{name}={value}")
    return " ".join(parts)


class LoggingListener:
    """A listener that logs each event as one structured record (``extra`` = the event's fields, redacted).

    ``levels`` maps event types to levels (default :data:`DEFAULT_LEVELS`): an event takes the level of its most
    specific type listed (``Rejected`` covers every rejection); an event class's name works as a key too. Any other
    event — including those of layers written later — logs at ``level``. ``redactor=None`` turns redaction off.
    """

    def __init__(
        self,
        logger: str | logging.Logger = "resilient_dspy",
        level: int = logging.INFO,
        *,
        levels: Mapping[type[Event], int] | Mapping[str, int] | Mapping[LevelKey, int] | None = None,
        redactor: Redactor | None = _DEFAULT_REDACTOR,
    ) -> None:
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
        self.level = level
        given = DEFAULT_LEVELS if levels is None else levels
        self.levels: dict[LevelKey, int] = {kind: level for kind, level in given.items()}
        self.redactor = redactor

    def level_of(self, kind: type[Event]) -> int:
        """The level for events of ``kind``: that of its most specific class in ``levels`` (by type, else by
        name), else ``level``."""
        levels = self.levels
        for base in kind.__mro__:
            level = levels.get(base)
            if level is None:
                level = levels.get(base.__name__)
            if level is not None:
                return level
        return self.level

    def __call__(self, event: Event) -> None:
        name = type(event).__name__
        level = self.level_of(type(event))
        if not self.logger.isEnabledFor(level):
            return
        fields = event_fields(event)
        if self.redactor is not None:
            fields = self.redactor.redact(fields)
        self.logger.log(level, "%s %s", name, _summary(fields), extra=_extra(fields))

    def __repr__(self) -> str:
        return f"LoggingListener({self.logger.name!r}, level={logging.getLevelName(self.level)})"


class LogCalls:
    """Middleware that logs each call when it ends: outcome, duration, attempts, served_by and redacted inputs.

    Place it outermost to log what the caller saw. Successes log at ``level``, failures at ``error_level`` with
    the error as ``{"type", "message"}``; nothing is measured when the logger would drop both.
    """

    def __init__(
        self,
        logger: str | logging.Logger = "resilient_dspy.calls",
        level: int = logging.INFO,
        *,
        error_level: int = logging.WARNING,
        inputs: bool = True,
        redactor: Redactor | None = _DEFAULT_REDACTOR,
    ) -> None:
        self.logger = logger if isinstance(logger, logging.Logger) else logging.getLogger(logger)
        self.level = level
        self.error_level = error_level
        self.inputs = inputs
        self.redactor = redactor

    async def __call__(self, call: Call, next: Handler) -> Any:
        if not self.logger.isEnabledFor(min(self.level, self.error_level)):
            return await next(call)
        started = call.clock.now()
        try:
            result = await next(call)
        except BaseException as error:
            safely("LogCalls", self._log, call, started, error)
            raise
        safely("LogCalls", self._log, call, started, None)
        return result

    def _log(self, call: Call, started: float, error: BaseException | None) -> None:
        level = self.level if error is None else self.error_level
        if not self.logger.isEnabledFor(level):
            return
        report = report_call(call, started, None, error)
        fields: dict[str, Any] = {
            "event": "CallFinished",
            "pipeline": report.pipeline,
            "outcome": report.outcome,
            "duration": round(report.duration, 6),
            "attempts": report.attempts,
            "retries": report.retries,
            "served_by": report.served_by,
            "error": error,
        }
        if self.inputs:
            fields["inputs"] = call.inputs
        fields = to_plain(fields) if self.redactor is None else self.redactor.redact(fields)
        self.logger.log(level, "call %s %s", report.pipeline, _summary(fields), extra=_extra(fields))

    def describe(self) -> dict[str, Any]:
        return {
            "layer": "LogCalls",
            "logger": self.logger.name,
            "level": logging.getLevelName(self.level),
            "error_level": logging.getLevelName(self.error_level),
            "inputs": self.inputs,
            "redacted": self.redactor is not None,
        }


class JsonFormatter(logging.Formatter):
    """One JSON object per record: timestamp (UTC, ISO 8601), level, logger, message, then every ``extra``.

    An exception becomes ``exception: {"type", "message", "traceback"}``. With ``redactor`` the whole object is
    redacted (use it when other code logs through the same handler); ``static`` fields are added to each line.
    """

    def __init__(self, *, redactor: Redactor | None = None, static: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.redactor = redactor
        self.static = dict(static or {})

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        payload.update(self.static)
        for name, value in record.__dict__.items():
            if name not in _RECORD_ATTRIBUTES and name not in payload:
                payload[name] = value
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            payload["exception"] = {
                "type": type(error).__name__,
                "message": str(error),
                "traceback": self.formatException(record.exc_info),
            }
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        plain = to_plain(payload, max_depth=16) if self.redactor is None else self.redactor.redact(payload)
        return json.dumps(plain, ensure_ascii=False, separators=(",", ":"))


class RedactingFilter(logging.Filter):
    """A handler filter that redacts a record's message, arguments and extras in place (any text formatter)."""

    def __init__(self, redactor: Redactor | None = None) -> None:
        super().__init__()
        self.redactor = redactor or _DEFAULT_REDACTOR

    def filter(self, record: logging.LogRecord) -> bool:
        redactor = self.redactor
        record.msg = redactor.redact_text(record.getMessage())
        record.args = None
        for name, value in list(record.__dict__.items()):
            if name not in _RECORD_ATTRIBUTES:
                setattr(record, name, redactor.redact(value))
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = redactor.redact_text(logging.Formatter().formatException(record.exc_info))
        return True
