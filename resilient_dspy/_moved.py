"""Old import paths kept for one release: each shim module warns (DeprecationWarning) and re-exports the new one,
and each name the package root no longer exports still resolves there, warning with its new module.

See docs/architecture.md for the layout the names moved to and the public surface.
"""

from __future__ import annotations

import importlib
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["MOVED", "MOVED_FROM_ROOT", "alias", "moved_names"]

# old module -> the modules its names moved to (first one wins a name); the shims at the old paths read this.
MOVED: dict[str, tuple[str, ...]] = {
    "resilient_dspy.cache_backends": (
        "resilient_dspy.middleware.cache.backends",
        "resilient_dspy.middleware.cache.serializer",
        "resilient_dspy.middleware.cache.backends.protocol",
        "resilient_dspy.middleware.cache.backends.memory",
        "resilient_dspy.middleware.cache.backends.expiry",
        "resilient_dspy.middleware.cache.backends.disk",
        "resilient_dspy.middleware.cache.backends.tiered",
        "resilient_dspy.middleware.cache.backends.aiocache_backend",
    ),
    "resilient_dspy.chaos_cli": ("resilient_dspy.cli.chaos",),
    "resilient_dspy.clock": ("resilient_dspy.core.clock",),
    "resilient_dspy.demo": ("resilient_dspy.cli.demo",),
    "resilient_dspy.dspy_binding": (
        "resilient_dspy.binding.targets",
        "resilient_dspy.binding.shape",
        "resilient_dspy.binding.usage",
        "resilient_dspy.binding.settings",
        "resilient_dspy.binding.lm_identity",
        "resilient_dspy.core.pipeline",
    ),
    "resilient_dspy.estimate": ("resilient_dspy.binding.estimate",),
    "resilient_dspy.health": ("resilient_dspy.core.health",),
    "resilient_dspy.options": ("resilient_dspy.core.options",),
    "resilient_dspy.partition": ("resilient_dspy.middleware._shared.partitions",),
    "resilient_dspy.pipeline": ("resilient_dspy.core.pipeline", "resilient_dspy.core.call"),
    "resilient_dspy.trace": ("resilient_dspy.core.trace",),
}


def _importer_level() -> int:
    """The stacklevel of the code importing the shim (past the shim's body and importlib's frames)."""
    frame, level = sys._getframe(3), 3
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame, level = frame.f_back, level + 1  # type: ignore[assignment]
    return level


def alias(old: str) -> None:
    """Make module ``old`` an alias of the modules it moved to (:data:`MOVED`), warning once on import."""
    new = MOVED[old]
    warnings.warn(
        f"{old} is deprecated and will be removed in the next release; import from {' or '.join(new)}",
        DeprecationWarning,
        stacklevel=_importer_level(),
    )
    targets = [importlib.import_module(name) for name in new]
    shim = sys.modules.get(old)
    if shim is None:  # run as a script (python -m <old path>): nothing imports it by its name
        return
    exported: list[str] = []
    for target in reversed(targets):
        for name in getattr(target, "__all__", ()):
            setattr(shim, name, getattr(target, name))
            if name not in exported:
                exported.append(name)
    shim.__dict__["__all__"] = sorted(exported)

    def __getattr__(name: str) -> Any:  # the private names too, for code that reached into the old module
        for target in targets:
            if hasattr(target, name):
                return getattr(target, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    shim.__dict__["__getattr__"] = __getattr__


# the names the package root exported before its surface was cut down (issue 15), by the module that exports them now
_LEFT_THE_ROOT: dict[str, tuple[str, ...]] = {
    "resilient_dspy.core": ("Call", "CallRecord", "Clock", "Handler", "LoopClock", "Middleware"),
    "resilient_dspy.errors": (
        "ConfigurationError",
        "ErrorInfo",
        "ErrorKind",
        "RequestTooLargeError",
        "ResilienceWarning",
        "classify",
    ),
    "resilient_dspy.events": (
        "Event",
        "BudgetAlert",
        "BudgetRejected",
        "BudgetSpent",
        "BulkheadAcquired",
        "BulkheadQueued",
        "BulkheadRejected",
        "CacheBackendFailed",
        "CacheCoalesced",
        "CacheHit",
        "CacheMiss",
        "CacheNotStored",
        "CacheStored",
        "ChaosInjected",
        "CircuitRejected",
        "CircuitStateChanged",
        "FallbackUsed",
        "GuardRejectedInput",
        "GuardRejectedOutput",
        "RateLimitReconciled",
        "RateLimitRejected",
        "RateLimitWaited",
        "RetryGaveUp",
        "RetryScheduled",
        "TimeoutFired",
    ),
    "resilient_dspy.middleware.breaker": ("CircuitSnapshot", "CircuitState"),
    "resilient_dspy.middleware.budget": ("BudgetSnapshot", "BudgetUsage"),
    "resilient_dspy.middleware.bulkhead": ("BulkheadSnapshot",),
    "resilient_dspy.middleware.cache": ("CacheStats",),
    "resilient_dspy.middleware.cache.backends": (
        "AiocacheBackend",
        "CacheBackend",
        "DiskBackend",
        "MemoryBackend",
        "NowaitBackend",
        "TieredBackend",
    ),
    "resilient_dspy.middleware.ratelimit": ("LimitUsage", "RateLimiterSnapshot"),
}

MOVED_FROM_ROOT: dict[str, str] = {name: module for module, names in _LEFT_THE_ROOT.items() for name in names}
"""Old root name -> the module to import it from now; the root's ``__getattr__`` reads this."""


def moved_names(package: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) for ``package``: each name of ``moved`` resolves at its new module and warns
    (DeprecationWarning) naming it; anything else is an AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        new = moved.get(name)
        if new is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # `from package import name` first asks importlib's hasattr, then the importing line: warn once, for that line
        if not sys._getframe(1).f_code.co_filename.startswith("<frozen importlib"):
            warnings.warn(
                f"{package}.{name} is deprecated and will be removed in the next release; import it from {new}",
                DeprecationWarning,
                stacklevel=2,
            )
        return getattr(importlib.import_module(new), name)

    return __getattr__
