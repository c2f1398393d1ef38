"""A usage scope: the LM usage of one call, recorded apart from DSPy's tracker, and handed back to it."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import dspy

from resilient_dspy.binding.settings import setting

if TYPE_CHECKING:
    pass

try:  # DSPy's own settings store and usage tracker, as in resilient_dspy.binding.settings
    from dspy.dsp.utils.settings import main_thread_config as _MAIN_CONFIG
    from dspy.dsp.utils.settings import thread_local_overrides as _OVERRIDES
    from dspy.dsp.utils.utils import dotdict as _dotdict
    from dspy.utils.usage_tracker import UsageTracker as _UsageTracker
except ImportError:  # pragma: no cover - a DSPy that moved these; fall back to its public API
    _OVERRIDES = None

__all__ = ["UsageScope", "attach_usage", "usage_scope"]


class UsageScope:
    """The LM usage recorded inside one :class:`usage_scope`: tokens by model, as DSPy's tracker sums them."""

    __slots__ = ("tracker",)

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def by_model(self) -> dict[str, dict[str, Any]]:
        if not self.tracker.usage_data:
            return {}
        return dict(self.tracker.get_total_tokens())

    def total_tokens(self, by_model: dict[str, dict[str, Any]] | None = None) -> int:
        """Prompt + completion tokens of every LM response (DSPy cache hits excluded) in the scope."""
        total = 0
        for usage in (self.by_model() if by_model is None else by_model).values():
            value = usage.get("total_tokens")
            if not isinstance(value, int):
                value = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
            total += int(value)
        return total


class usage_scope:
    """Record the LM usage of the code inside (per task: DSPy's tracker lives in a ContextVar).

    The same as ``with dspy.track_usage()``, which rolls the usage up into an enclosing tracker on exit, but
    it only adds the tracker to the context's overrides instead of snapshotting all of DSPy's settings: ~1 µs
    instead of ~9 µs and ~1 KB per in-flight call, and settings read inside stay exactly what they were outside.

    DSPy's ``Module.acall`` only attaches ``get_lm_usage()`` to its prediction when no tracker is active, so
    a layer that measures usage must hand it back: :func:`attach_usage` does that when the user tracks usage.
    """

    __slots__ = ("_fallback", "_parent", "_token", "_tracker")

    def __enter__(self) -> UsageScope:
        if _OVERRIDES is None:  # pragma: no cover
            self._fallback: Any = dspy.track_usage()
            return UsageScope(self._fallback.__enter__())
        self._fallback = None
        tracker = self._tracker = _UsageTracker()
        overrides = _OVERRIDES.get()
        self._parent = overrides["usage_tracker"] if "usage_tracker" in overrides else _MAIN_CONFIG.get("usage_tracker")
        inner = _dotdict(overrides)
        inner["usage_tracker"] = tracker
        self._token = _OVERRIDES.set(inner)
        return UsageScope(tracker)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if self._fallback is not None:  # pragma: no cover
            self._fallback.__exit__(kind, error, traceback)
            return
        _OVERRIDES.reset(self._token)
        parent = self._parent
        if parent is not None:
            for lm, entries in self._tracker.usage_data.items():
                parent.usage_data[lm].extend(entries)


def attach_usage(result: Any, scope: UsageScope) -> None:
    """Give ``result`` the usage DSPy would have attached had our scope not been active (``track_usage`` on)."""
    if isinstance(result, dspy.Prediction) and setting("track_usage") and result.get_lm_usage() is None:
        result.set_lm_usage(scope.by_model())
