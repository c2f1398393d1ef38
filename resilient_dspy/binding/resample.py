"""What a retried attempt changes in its request, so a model that answered badly is asked something new.

Re-asking a model the same request at temperature 0 returns the same bad output (measured on SmolLM2: 5 times out of
5), so Retry, after a parse error, an invalid output or a truncated answer, puts a :class:`Resample` in
``call.properties[RESAMPLE]`` for the next attempt and the target applies it to every LM the program uses, on a copy
for that attempt only: a fresh DSPy ``rollout_id`` (its cache key: DSPy's cache misses), a temperature at least
``temperature`` (an explicit one only: ``None`` means the provider's default, which samples already), a
``max_tokens`` at least ``max_tokens``, and optionally the other adapter (Chat ↔ JSON).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import dspy

__all__ = ["RESAMPLE", "Resample", "other_adapter"]

RESAMPLE = "resilient_dspy.resample"
"""The ``call.properties`` key Retry writes a :class:`Resample` under, for a cache-bypass attempt."""


@dataclass(frozen=True, slots=True)
class Resample:
    """How one retried attempt's request differs from the first (None/False: unchanged)."""

    rollout_id: int | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    switch_adapter: bool = False

    def lm_changes(self, lm: Any) -> dict[str, Any]:
        """The ``lm.copy(...)`` / call kwargs that apply this resample to ``lm`` (never lowering what it asks)."""
        kwargs: dict[str, Any] = getattr(lm, "kwargs", None) or {}
        changes: dict[str, Any] = {}
        if self.rollout_id is not None:
            changes["rollout_id"] = self.rollout_id
        current = kwargs.get("temperature")
        if self.temperature is not None and isinstance(current, int | float) and current < self.temperature:
            changes["temperature"] = self.temperature
        if self.max_tokens is not None:
            name = "max_completion_tokens" if "max_completion_tokens" in kwargs else "max_tokens"
            limit = kwargs.get(name)
            if not isinstance(limit, int) or limit < self.max_tokens:
                changes[name] = self.max_tokens
        return changes


def other_adapter(adapter: Any) -> Any:
    """JSON for Chat (DSPy's default when ``adapter`` is None), Chat for JSON; any other adapter unchanged."""
    if isinstance(adapter, dspy.JSONAdapter):
        return dspy.ChatAdapter()
    if adapter is None or type(adapter) is dspy.ChatAdapter:
        return dspy.JSONAdapter()
    return adapter
