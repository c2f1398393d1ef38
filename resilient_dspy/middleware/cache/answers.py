"""What a Cache stores and serves: an answer encoded with the LM usage that made it (the classes it may hold are
learned from the program), decoded into a fresh object for every hit and follower, and the usage and cost saved.

A hit on bytes already decoded (an in-memory backend hands back the very bytes it stored) is served as a copy of that
decoding, made without JSON: a ``dspy.Prediction`` is rebuilt in a fraction of what decoding it costs, and the
caller still gets an object of its own.

A value the serializer cannot encode is not stored (logged once per type); bytes it cannot read are a miss (logged).
"""

from __future__ import annotations

import copy
import enum
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import dspy
from dspy.primitives.prediction import Completions
from pydantic import BaseModel

from resilient_dspy.binding.settings import setting
from resilient_dspy.middleware.cache.serializer import (
    CachedEntry,
    CacheSerializer,
    CorruptEntryError,
    UnencodableError,
    UnknownTypeError,
    _type_name,
)

if TYPE_CHECKING:
    from resilient_dspy.core.layer import Layer
    from resilient_dspy.middleware.cache.events import Counters
    from resilient_dspy.middleware.cache.flight import Answer
    from resilient_dspy.middleware.cache.options import CachePriceFunction

__all__ = ["Answers"]

logger = logging.getLogger("resilient_dspy.cache")

_REPORTED_AT_MOST = 256
"""Problems remembered as already logged; beyond it a new one is logged each time (memory stays bounded)."""

_DECODED_AT_MOST = 1024
"""Entries whose decoding is kept for copying; past it the memo starts over (memory stays bounded)."""

_IMMUTABLE = frozenset({str, int, float, bool, type(None), bytes, frozenset})
_RECORDS = frozenset({dspy.Prediction, dspy.Example, Completions})


class _NoCopy(Exception):
    """A decoded value holds something :func:`_copy` does not rebuild (a pydantic model): decode it again."""


class Answers:
    """Encoding and serving the answers of one Cache; ``owner`` names it in logs."""

    __slots__ = ("_annotations", "_count", "_decoded", "_owner", "_price", "_reported", "serializer")

    def __init__(
        self, owner: Layer, counters: Counters, types: tuple[type, ...], price: CachePriceFunction | None
    ) -> None:
        self._owner = owner
        self._count = counters
        self._price = price
        self.serializer = CacheSerializer(types)
        self._annotations: Callable[[], tuple[Any, ...]] = tuple
        self._reported: set[str] = set()
        self._decoded: dict[str, tuple[bytes, CachedEntry]] = {}  # per key: the bytes last decoded, their decoding

    def learn(self, annotations: Callable[[], tuple[Any, ...]]) -> None:
        """Allow the classes in the program's annotations now, and again whenever an answer needs one not yet
        allowed (a signature changed after the pipeline was built)."""
        self._annotations = annotations
        self._allow_program_types()

    def _allow_program_types(self) -> None:
        for annotation in self._annotations():
            self.serializer.allow_annotation(annotation)

    def encode(self, value: Any, usage: dict[str, Any], tokens: int) -> bytes | None:
        """The stored form of ``value`` with its usage, or None (logged once per type) when it cannot be encoded."""
        for retry in (True, False):  # the owner's name is read only to log a failure: it is a property
            try:
                return self.serializer.dumps(value, usage, tokens)
            except UnencodableError as error:
                if retry and issubclass(error.kind, BaseModel | enum.Enum):
                    self._allow_program_types()
                    continue
                self._report_once(_type_name(error.kind), "%s: answer not cached: %s", self._owner.name, error)
                return None
            except Exception as error:
                self._report_once(_type_name(type(value)), "%s: answer not cached: %r", self._owner.name, error)
                return None
        return None

    def decode(self, key: str, data: object, keep: bool = False) -> CachedEntry | None:
        """The entry stored as ``data`` (fresh objects), or None (logged) when it is not bytes this cache can read.

        ``keep``: the backend hands back the very bytes it stored (in memory), so a copy of this decoding can serve
        the next hit on them without decoding again."""
        seen = self._decoded.get(key) if keep else None
        if seen is not None and seen[0] is data:
            kept = seen[1]
            return CachedEntry(_copy(kept.value), _copy(kept.usage), kept.tokens)
        entry = self._load(key, data)
        if keep and entry is not None and type(data) is bytes:
            try:
                kept = CachedEntry(_copy(entry.value), _copy(entry.usage), entry.tokens)
            except _NoCopy:
                return entry
            decoded = self._decoded
            if len(decoded) >= _DECODED_AT_MOST:
                decoded.clear()
            decoded[key] = (data, kept)
        return entry

    def _load(self, key: str, data: object) -> CachedEntry | None:
        if type(data) is not bytes:
            kind = type(data).__name__
            logger.warning("%s: backend returned a %s for %s; treated as a miss", self._owner.name, kind, key)
            return None
        for retry in (True, False):
            try:
                return self.serializer.loads(data)
            except UnknownTypeError as error:
                if retry:
                    self._allow_program_types()
                    continue
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self._owner.name, key, error)
            except CorruptEntryError as error:
                logger.warning("%s: unreadable entry %s (%s); treated as a miss", self._owner.name, key, error)
                return None
        return None

    def fresh(self, answer: Answer) -> tuple[Any, dict[str, Any]]:
        """A follower's own copy of the leader's answer and usage, so no caller can mutate another's result."""
        if answer.data is not None:
            entry = self._load("(in flight)", answer.data)
            if entry is not None:
                return entry.value, entry.usage
        try:
            return copy.deepcopy(answer.value), copy.deepcopy(answer.usage)
        except Exception:
            return answer.value, answer.usage

    @staticmethod
    def served(value: Any, usage: dict[str, Any]) -> Any:
        """``value`` as served: a Prediction reports the usage that made it (with ``track_usage`` on)."""
        if type(value) is dspy.Prediction and setting("track_usage"):
            value.set_lm_usage(usage)
        return value

    def saved(self, usage: dict[str, Any], tokens: int) -> None:
        """Count an answer served without running the program: its tokens, and its cost priced by ``price=`` (a
        failing price function is logged and leaves it out)."""
        count = self._count
        count.saved_tokens += tokens
        price = self._price
        if price is not None and usage:
            try:
                self._count.saved_cost += float(price(usage))
            except Exception:
                logger.exception("%s: the price function failed; saved_cost leaves this answer out", self._owner.name)

    def _report_once(self, topic: str, message: str, *args: object) -> None:
        if topic in self._reported:
            return
        if len(self._reported) < _REPORTED_AT_MOST:
            self._reported.add(topic)
        logger.warning(message, *args)


def _copy(value: Any) -> Any:
    """A copy of a decoded value sharing nothing mutable with it (what decoding the same bytes again would build);
    immutable leaves are taken as they are without a call, the bulk of a Prediction's fields and usage."""
    kind = type(value)
    if kind in _IMMUTABLE:
        return value
    if kind is dict:
        return {k: v if type(v) in _IMMUTABLE else _copy(v) for k, v in value.items()}
    if kind is list:
        return [item if type(item) in _IMMUTABLE else _copy(item) for item in value]
    if kind is tuple:
        return tuple(_copy(item) for item in value)
    if kind is set:
        return {_copy(item) for item in value}
    if kind in _RECORDS:
        record = object.__new__(kind)
        record.__dict__.update({k: v if type(v) in _IMMUTABLE else _copy(v) for k, v in value.__dict__.items()})
        return record
    if isinstance(value, enum.Enum):
        return value
    raise _NoCopy(kind.__name__)
