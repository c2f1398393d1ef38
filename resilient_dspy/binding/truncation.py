"""Whether a parse failure was an answer cut at ``max_tokens``: DSPy only logs "LM response was truncated".

An ``AdapterParseError`` carries the text that failed to parse; the LM's history entry with that same output says how
it finished (``finish_reason="length"``) and what it asked (``max_tokens``). Only the latest few entries of each LM the
program used are read, and only after a parse error, so an answer costs nothing; with DSPy's history off
(``dspy.settings.disable_history``) a cut answer stays a plain parse error.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import dspy

from resilient_dspy.errors import TruncatedOutputError

__all__ = ["truncation_of"]

_LOOKBACK = 16
"""History entries read per LM: enough for the concurrent calls of one LM between an answer and its parse."""


def truncation_of(error: dspy.AdapterParseError, lms: Iterable[Any]) -> TruncatedOutputError | None:
    """The :class:`TruncatedOutputError` for ``error`` (its cause set) if one of ``lms`` cut that answer, else None."""
    text = getattr(error, "lm_response", None)
    if not isinstance(text, str):
        return None
    seen: set[int] = set()
    for lm in lms:
        if lm is None or id(lm) in seen:
            continue
        seen.add(id(lm))
        history = getattr(lm, "history", None)
        if not isinstance(history, list):
            continue
        for entry in reversed(history[-_LOOKBACK:]):
            if isinstance(entry, dict) and text in _texts(entry.get("outputs")) and _cut(entry.get("response")):
                cut = TruncatedOutputError(_max_tokens(entry, lm), model=getattr(lm, "model", None), lm_response=text)
                cut.__cause__ = error
                return cut
    return None


def _texts(outputs: Any) -> list[Any]:
    """The texts of a history entry's outputs (strings, or dicts with a ``text``)."""
    if not isinstance(outputs, list):
        return []
    return [item.get("text") if isinstance(item, dict) else item for item in outputs]


def _finish_reasons(response: Any) -> Iterable[Any]:
    """The finish reasons of a history entry's response: lm15 ``Response`` objects, or an OpenAI-shaped raw reply."""
    for item in response if isinstance(response, list) else [response]:
        reason = getattr(item, "finish_reason", None)
        if reason is not None:
            yield reason
            continue
        choices = item.get("choices") if isinstance(item, dict) else getattr(item, "choices", None)
        for choice in choices or ():
            yield choice.get("finish_reason") if isinstance(choice, dict) else getattr(choice, "finish_reason", None)


def _cut(response: Any) -> bool:
    return any(reason == "length" for reason in _finish_reasons(response))


def _max_tokens(entry: dict[str, Any], lm: Any) -> int | None:
    """The limit the cut request asked for: its lm15 request's, else the call's or the LM's kwargs."""
    request = entry.get("request")
    limit = getattr(getattr(request, "config", None), "max_tokens", None)
    if isinstance(limit, int):
        return limit
    for kwargs in (entry.get("kwargs"), getattr(lm, "kwargs", None)):
        if isinstance(kwargs, dict):
            for name in ("max_tokens", "max_completion_tokens"):
                if isinstance(kwargs.get(name), int):
                    return int(kwargs[name])
    return None
