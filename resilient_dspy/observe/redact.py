"""Redaction of secrets and personal data from anything about to be logged or exported.

A :class:`Redactor` holds named regular expressions; a match is replaced by ``replacement`` (only the group named
``secret`` when the pattern has one, so ``api_key=`` stays readable). A pattern may carry a check of the matched
text (a card's Luhn digit, an IBAN's mod-97 checksum): a match the check refuses is kept.
:meth:`Redactor.redact` walks nested mappings, sequences, exceptions, pydantic models and dataclasses, returns a
JSON-safe copy, and also blanks the value of any mapping key that names a secret (``api_key``, ``authorization``,
``password``, …).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from pydantic import BaseModel

__all__ = [
    "DEFAULT_CHECKS",
    "DEFAULT_PATTERNS",
    "DEFAULT_SECRET_KEYS",
    "Redactor",
    "iban_valid",
    "ipv6_valid",
    "luhn_valid",
    "ssn_valid",
    "to_plain",
]

_BYTE = r"(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"

DEFAULT_PATTERNS: Mapping[str, str] = {
    "payment_card": r"(?<![\w\-])[2-6](?:[ \-]?[0-9]){12,18}(?![\w\-])",
    "iban": r"(?<![A-Za-z0-9])[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}(?![A-Za-z0-9])",
    "ssn_us": r"(?<![\w\-])[0-9]{3}([ \-])[0-9]{2}\1[0-9]{4}(?![\w\-])",
    "ipv4": rf"(?<![\w.])(?:{_BYTE}\.){{3}}{_BYTE}(?!\.?[0-9])(?!\w)",
    "ipv6": r"(?<![\w:])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{1,4}|[0-9]{1,3}(?:\.[0-9]{1,3}){3})?(?![\w:])",
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
"""The default patterns, applied in this order: payment cards (13 to 19 digits starting 2-6, in groups split by
single spaces or dashes, Luhn-checked), IBANs (uppercase, compact or in groups of 4, mod-97-checked), US SSNs
(``123-45-6789`` or ``123 45 6789``, valid area/group/serial), IPv4 (dotted quad) and IPv6 (any form
``ipaddress`` accepts), bearer tokens, API keys, ``api_key=…``-style assignments, emails, international (``+`` and
8 to 15 digits) and US (``(555) 123-4567``, ``555-123-4567``) phone numbers."""

DEFAULT_SECRET_KEYS = (
    r"(?i)api[_\-]?key|apikey|secret|passw|authorization|cookie|credential|private[_\-]?key|(?:^|[_\-])token$"
)
"""Mapping keys whose whole value is replaced, whatever it looks like (``max_tokens`` and ``saved_tokens`` are not)."""

Pattern = str | re.Pattern[str]
Check = Callable[[str], bool]
"""Called with the matched text (the ``secret`` group when there is one): True redacts it, False keeps it."""
PatternSpec = Pattern | tuple[Pattern, Check]
"""A pattern, or a pattern with its check."""


def luhn_valid(text: str) -> bool:
    """True when the digits of ``text`` (separators ignored) end in a correct Luhn check digit."""
    total = 0
    for index, char in enumerate(reversed([c for c in text if "0" <= c <= "9"])):
        digit = ord(char) - 48
        if index % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10 == 0


def iban_valid(text: str) -> bool:
    """True when ``text`` (spaces ignored) is 15 to 34 characters whose ISO 13616 mod-97 checksum is 1."""
    compact = text.replace(" ", "")
    if not 15 <= len(compact) <= 34:
        return False
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(char, 36)) for char in rearranged)) % 97 == 1


def ssn_valid(text: str) -> bool:
    """True for a US SSN that can be issued: area not 000, 666 or 9xx; group not 00; serial not 0000."""
    area, group, serial = text[:3], text[4:6], text[7:]
    return area not in ("000", "666") and area[0] != "9" and group != "00" and serial != "0000"


def ipv6_valid(text: str) -> bool:
    """True for an IPv6 address with a decimal digit (``::1``, ``2001:db8::1``, ``::ffff:10.0.0.1``, the full form).

    Wanting a digit keeps ``a::b`` (C++, Rust paths) as it is; an all-letter address such as ``dead::beef`` is kept too.
    """
    if not any("0" <= char <= "9" for char in text):
        return False
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


DEFAULT_CHECKS: Mapping[str, Check] = {
    "payment_card": luhn_valid,
    "iban": iban_valid,
    "ssn_us": ssn_valid,
    "ipv6": ipv6_valid,
}
"""The checks of the default patterns that a regex alone would over-match."""

_DIGITS = "0123456789"
_TRIGGERS: Mapping[str, Callable[[str, str], bool]] = {
    "payment_card": lambda text, lower: any(digit in text for digit in _DIGITS),
    "iban": lambda text, lower: any(digit in text for digit in _DIGITS),
    "ssn_us": lambda text, lower: any(digit in text for digit in _DIGITS),
    "ipv4": lambda text, lower: "." in text,
    "ipv6": lambda text, lower: "::" in text or text.count(":") >= 7,
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


def _separators(text: str, start: int, end: int) -> list[int]:
    return [index for index in range(start + 1, end - 1) if text[index] in " -"]


def _checked_span(pattern: re.Pattern[str], check: Check, text: str, match: re.Match[str]) -> tuple[int, int] | None:
    """The first, longest part of ``match`` that the pattern still matches whole and ``check`` accepts.

    The regex is greedy: a card number followed by `` 12`` matches as one longer, Luhn-invalid number. Trying the
    spans between separators finds the real one inside it, whatever digits or letters stand around it.
    """
    start, end = match.span()
    if check(_checked_text(match)):
        return start, end
    cuts = _separators(text, start, end)
    starts = [start, *(cut + 1 for cut in cuts)]
    ends = [end, *reversed(cuts)]
    for low in starts:
        for high in ends:
            if high <= low:
                break
            inner = pattern.fullmatch(text[:high], low)
            if inner is not None and check(_checked_text(inner)):
                return low, high
    return None


def _checked_text(match: re.Match[str]) -> str:
    if "secret" in match.re.groupindex and match.start("secret") >= 0:
        return match.group("secret")
    return match.group(0)


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
    adds to them. A pattern is a string or compiled regex, or a ``(pattern, check)`` pair whose check of the matched
    text decides (e.g. ``(r"\\b\\d{16}\\b", luhn_valid)``); with a group named ``secret`` only that group goes.
    """

    __slots__ = ("_clean", "_patterns", "_secret_key", "max_depth", "names", "replacement")

    _CLEAN_MAX = 4096
    _CLEAN_LENGTH = 256

    def __init__(
        self,
        patterns: Mapping[str, PatternSpec] | None = None,
        extra_patterns: Mapping[str, PatternSpec] | Iterable[PatternSpec] = (),
        replacement: str = "[REDACTED]",
        *,
        secret_keys: Pattern | None = DEFAULT_SECRET_KEYS,
        max_depth: int = 8,
    ) -> None:
        named: dict[str, PatternSpec] = dict(DEFAULT_PATTERNS if patterns is None else patterns)
        if isinstance(extra_patterns, Mapping):
            named.update(extra_patterns)
        else:
            for index, pattern in enumerate(extra_patterns):
                named[f"extra_{index}"] = pattern
        self.names: tuple[str, ...] = tuple(named)
        compiled = []
        for name, spec in named.items():
            pattern, check = spec if isinstance(spec, tuple) else (spec, None)
            default = isinstance(pattern, str) and pattern == DEFAULT_PATTERNS.get(name)
            if default and check is None:
                check = DEFAULT_CHECKS.get(name)
            compiled.append((_compile(pattern), _TRIGGERS.get(name) if default else None, check))
        self._patterns: tuple[tuple[re.Pattern[str], Callable[[str, str], bool] | None, Check | None], ...] = tuple(
            compiled
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

    def _sub_checked(self, pattern: re.Pattern[str], check: Check, text: str) -> str:
        """``pattern.sub`` for a pattern with a check: only the spans the check accepts are replaced."""
        pieces: list[str] = []
        done = 0
        match = pattern.search(text)
        while match is not None:
            span = _checked_span(pattern, check, text, match)
            if span is None:  # refused whole: a real one may start inside it and end past it ("2000000 <card>")
                match = pattern.search(text, match.start() + 1)
                continue
            inner = pattern.fullmatch(text[: span[1]], span[0])
            assert inner is not None
            pieces.append(text[done : span[0]])
            pieces.append(self._replace(inner))
            done = span[1]
            match = pattern.search(text, done)
        if not pieces:
            return text
        pieces.append(text[done:])
        return "".join(pieces)

    def redact_text(self, text: str) -> str:
        """``text`` with every pattern match replaced (short texts found clean are remembered as clean)."""
        clean = self._clean
        if text in clean:
            return text
        original = text
        lower = text.lower()
        for pattern, trigger, check in self._patterns:
            if trigger is None or trigger(text, lower):
                text = pattern.sub(self._replace, text) if check is None else self._sub_checked(pattern, check, text)
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
