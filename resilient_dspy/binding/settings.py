"""DSPy's settings read cheaply, and DSPy's own retries (off, or warned about once per LM)."""

from __future__ import annotations

import warnings
import weakref
from typing import TYPE_CHECKING, Any

import dspy

from resilient_dspy.errors import ResilienceWarning

if TYPE_CHECKING:
    pass

__all__ = ["RetryWatch", "no_dspy_retries", "setting"]


def no_dspy_retries(lm: dspy.LM) -> dspy.LM:
    """A copy of ``lm`` with DSPy's own retries off, for use under a :class:`~resilient_dspy.Retry`."""
    return lm.copy(num_retries=0)


try:  # DSPy's own settings store, read directly: ``dspy.settings.<name>`` costs an AttributeError round trip
    from dspy.dsp.utils.settings import main_thread_config as _MAIN_CONFIG
    from dspy.dsp.utils.settings import thread_local_overrides as _OVERRIDES
except ImportError:  # pragma: no cover - a DSPy that moved these; fall back to its public API
    _OVERRIDES = None


def setting(name: str) -> Any:
    """``dspy.settings.<name>`` in the current context, or None when unset; ~10x cheaper than the attribute."""
    if _OVERRIDES is None:  # pragma: no cover
        return getattr(dspy.settings, name, None)
    overrides = _OVERRIDES.get()
    if name in overrides:
        return overrides[name]
    return _MAIN_CONFIG.get(name)


class RetryWatch:
    """Warns once per LM instance whose ``num_retries`` would multiply with our Retry's attempts."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.enabled = False
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    def check(self, lm: Any, stacklevel: int = 2) -> None:
        if not self.enabled or lm is None or lm in self._seen:
            return
        self._seen.add(lm)
        retries = getattr(lm, "num_retries", 0) or 0
        if retries > 0:
            warnings.warn(
                f"{self.owner}: LM {getattr(lm, 'model', lm)!r} has num_retries={retries}, so DSPy retries each "
                f"of our attempts {retries} more time(s) with its own unjittered sleeps. Build it with "
                "num_retries=0 or wrap it in resilient_dspy.no_dspy_retries(lm).",
                ResilienceWarning,
                stacklevel=stacklevel,
            )
