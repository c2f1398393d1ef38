"""Redaction of secrets and personal data from anything about to be logged or exported.

A :class:`Redactor` holds named regular expressions; a match is replaced by ``replacement`` (only the group named
``secret`` when the pattern has one, so ``api_key=`` stays readable). :meth:`Redactor.redact` walks nested
mappings, sequences, exceptions, pydantic models and dataclasses, returns a JSON-safe copy, and also blanks the
value of any mapping key that names a secret (``api_key``, ``authorization``, ``password``, …).
"""

from __future__ import annotations

import dataclasses
import enum
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

__all__ = ["DEFAULT_PATTERNS", "DEFAULT_SECRET_KEYS", "Redactor", "to_plain"]

DEFAULT_PATTERNS: Mapping[str, str] = {
    "bearer": r"(?i)\bbearer\s+(?P<secret>[A-Za-z0-9\-._~+/]{8,}+=*)",
    "anthropic_key": r"sk-ant-(?<![\w\-]sk-ant-)[A-Za-z0-9_\-]{8,}+",
    "openai_key": r"sk-(?<![\w\-]sk-)(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{16,}+",
    "api_key_assignment": (
        r"(?i)(?:api[_\-]?key|secret|password|passwd|access[_\-]?token|auth[_\-]?token)[\"']?\s*+[:=]\s*+[\"']?"
        r"(?P<secret>[^\s\"',;&}\]]++)"
    ),
    "email": (r"(?<![A-Za-z0-9._%+\-])[A-Za-z0-9._%+\-]++@[A-Za-z0-9\-]++(?:\.[A-Za-z0-9\-]++)++(?<=[A-Za-z]{2})"),
    "phone_international": r"(?<![\w+])\+(?:\d[ .\-()]{0,2}){7,14}\d(?!\w)",
    "phone_us": r"(?<![\w+])(?:\(\d{3}\)[ .\-]?|\d{3}[ .\-])\d{3}[ .\-]\d{4}(?!\w)",
}
"""The default patterns, applied in this order: API keys, bearer tokens, ``api_key=…``-style assignments, emails,
international (``+`` and 8 to 15 digits) and US (``(555) 123-4567``, ``555-123-4567``) phone numbers."""

DEFAULT_SECRET_KEYS = (
    r"(?i)api[_\-]?key|apikey|secret|passw|authorization|cookie|credential|private[_\-]?key|(?:^|[_\-])token$"
)
"""Mapping keys whose whole value is replaced, whatever it looks like (``max_tokens`` and ``saved_tokens`` are not)."""

Pattern = str | re.Pattern[str]

_DIGITS = "0123456789"
_TRIGGERS: Mapping[str, Callable[[str, str], bool]] = {
    "bearer": lambda text, lower: "bearer" in lower,
    "anthropic_key": lambda text, lower: "sk-ant-" in text,
    "openai_key": lambda text, lower: "sk-" in text,
    "api_key_assignment": lambda text, lower: (
        "key" in lower or "secret" in lower or "passw" in lower or "token" in lower
    ),
    "email": lambda text, lower: "@" in text,
    "phone_international": lambda text, lower: "+" in text,
    "phone_us": lambda text, lower: any(digit in text for digit in _DIGITS),
}
"""Cheap substring tests that must hold for a default pattern to match: most text skips the regex entirely."""


def _compile(pattern: Pattern) -> re.Pattern[str]:
    return pattern if isinstance(pattern, re.Pattern) else re.compile(pattern)


def to_plain(
    value: Any,
    text: Callable[[str], str] | None = None,
    secret_key: Callable[[str], bool] | None = None,
    replacement: str = "",
    max_depth: int = 8,
) -> Any:
    """A JSON-safe copy of ``value``: strings pass through ``text``, exceptions become ``{"type", "message"}``.

    Mappings become dicts (a key for which ``secret_key`` is true gets ``replacement`` as its value), sequences and
    sets lists, enums their value, pydantic models and dataclasses their fields; anything else its ``repr``.
    """

    scalars = (int, float, bool)

    def walk(item: Any, depth: int) -> Any:
        kind = type(item)
        if kind is str:
            return item if text is None else text(item)
        if item is None or kind in scalars:
            return item
        if kind is dict:
            return walk_mapping(item.items(), depth)
        if isinstance(item, str):
            return walk(str.__str__(item), depth)
        if isinstance(item, bool | int | float):
            return item
        if isinstance(item, enum.Enum):
            return walk(item.value, depth)
        if depth >= max_depth:
            return "..."
        if isinstance(item, BaseException):
            return {"type": type(item).__name__, "message": walk(str(item), depth)}
        if isinstance(item, Mapping):
            return walk_mapping(item.items(), depth)
        if isinstance(item, list | tuple | set | frozenset):
            return [walk(element, depth + 1) for element in item]
        if isinstance(item, bytes | bytearray):
            return f"<{len(item)} bytes>"
        if isinstance(item, BaseModel):
            try:
                return walk(item.model_dump(mode="json"), depth)
            except Exception:
                return walk(repr(item), depth)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return walk_mapping(((f.name, getattr(item, f.name)) for f in dataclasses.fields(item)), depth)
        items = getattr(item, "items", None)
        if callable(items) and hasattr(item, "keys"):
            try:
                return walk_mapping(items(), depth)
            except Exception:
                pass
        return walk(repr(item), depth)

    def walk_mapping(pairs: Iterable[tuple[Any, Any]], depth: int) -> dict[str, Any] | str:
        if depth >= max_depth:
            return "..."
        result: dict[str, Any] = {}
        for key, element in pairs:
            name = key if type(key) is str else str(walk(key, depth + 1))
            if text is not None:
                name = text(name)
            kind = type(element)
            if element is None:
                result[name] = None
            elif secret_key is not None and secret_key(name):
                result[name] = replacement
            elif kind in scalars:
                result[name] = element
            elif kind is str:
                result[name] = element if text is None else text(element)
            else:
                result[name] = walk(element, depth + 1)
        return result

    return walk(value, 0)


class _SecretKeys:
    """Whether a mapping key names a secret, remembered per key (keys repeat: field names, header names)."""

    __slots__ = ("_known", "_pattern")

    def __init__(self, pattern: re.Pattern[str]) -> None:
        self._pattern = pattern
        self._known: dict[str, bool] = {}

    def __call__(self, name: str) -> bool:
        known = self._known.get(name)
        if known is None:
            known = self._pattern.search(name) is not None
            if len(self._known) < 4096:
                self._known[name] = known
        return known


class Redactor:
    """Replace secrets and personal data in text and in nested structures (see the module docstring).

    ``patterns`` replaces the defaults (pass a filtered :data:`DEFAULT_PATTERNS` to drop one); ``extra_patterns``
    adds to them. A pattern is a string or compiled regex; with a group named ``secret`` only that group goes.
    """

    __slots__ = ("_clean", "_patterns", "_secret_key", "max_depth", "names", "replacement")

    _CLEAN_MAX = 4096
    _CLEAN_LENGTH = 256

    def __init__(
        self,
        patterns: Mapping[str, Pattern] | None = None,
        extra_patterns: Mapping[str, Pattern] | Iterable[Pattern] = (),
        replacement: str = "[REDACTED]",
        *,
        secret_keys: Pattern | None = DEFAULT_SECRET_KEYS,
        max_depth: int = 8,
    ) -> None:
        named = dict(DEFAULT_PATTERNS if patterns is None else patterns)
        if isinstance(extra_patterns, Mapping):
            named.update(extra_patterns)
        else:
            for index, pattern in enumerate(extra_patterns):
                named[f"extra_{index}"] = pattern
        self.names: tuple[str, ...] = tuple(named)
        self._patterns = tuple(
            (
                _compile(pattern),
                _TRIGGERS.get(name) if isinstance(pattern, str) and pattern == DEFAULT_PATTERNS.get(name) else None,
            )
            for name, pattern in named.items()
        )
        self._clean: set[str] = set()
        self.replacement = replacement
        self.max_depth = max_depth
        self._secret_key = None if secret_keys is None else _SecretKeys(_compile(secret_keys))

    def _replace(self, match: re.Match[str]) -> str:
        if "secret" not in match.re.groupindex or match.start("secret") < 0:
            return self.replacement
        whole, start = match.group(0), match.start()
        return whole[: match.start("secret") - start] + self.replacement + whole[match.end("secret") - start :]

    def redact_text(self, text: str) -> str:
        """``text`` with every pattern match replaced (short texts found clean are remembered as clean)."""
        clean = self._clean
        if text in clean:
            return text
        original = text
        lower = text.lower()
        for pattern, trigger in self._patterns:
            if trigger is None or trigger(text, lower):
                text = pattern.sub(self._replace, text)
        if text is original and len(text) <= self._CLEAN_LENGTH:
            if len(clean) >= self._CLEAN_MAX:
                clean.clear()
            clean.add(text)
        return text

    def redact(self, value: Any) -> Any:
        """A JSON-safe, redacted copy of ``value`` (strings, nested mappings and sequences, exceptions, models)."""
        return to_plain(value, self.redact_text, self._secret_key, self.replacement, self.max_depth)

    __call__ = redact

    def __repr__(self) -> str:
        return f"Redactor(patterns={list(self.names)}, replacement={self.replacement!r})"
