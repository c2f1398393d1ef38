"""The base of every built-in layer: one ``name``, one event emitter, one ``describe()``, ``snapshot()`` and
``health()``, and the ``on_build`` hook through which a layer reads its place in the pipeline.

A layer need not derive from :class:`Layer` (any :class:`~resilient_dspy.core.call.Middleware` works); deriving
gives it the shared shape for free. See docs/architecture.md ("How to add a layer").
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

from resilient_dspy.core.options import Options
from resilient_dspy.events import deliver

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.health import LayerHealth
    from resilient_dspy.core.pipeline import Pipeline
    from resilient_dspy.events import Event

__all__ = ["Layer", "roles"]


class Layer(ABC):
    """A middleware with the house shape. Subclasses set ``options`` (an :class:`Options` with a ``name`` field) in
    ``__init__`` and implement ``__call__``; every other method has a sensible default."""

    placement: ClassVar[str | None] = None
    """The role the pipeline's order rules and other layers read (``"retry"``, ``"timeout"``, ``"cache"`` …)."""

    coalesces: bool = False
    """True when calls through this layer may wait for another call's work (a single-flight cache)."""

    options_type: ClassVar[type[Options]]
    """The options model: the one place each option's type, default and rule are written."""

    options: Options

    @abstractmethod
    async def __call__(self, call: Call, next: Handler) -> Any:
        """Run the call through this layer: ``await next(call)`` (or not), with the layer's rule around it."""

    @property
    def name(self) -> str:
        """The label in events, metrics, traces and ``describe()``: ``name=`` when given, else :meth:`default_name`."""
        given = getattr(self.options, "name", None)
        return given if isinstance(given, str) and given else self.default_name()

    def default_name(self) -> str:
        """The label when no ``name=`` is given: the class name (a Timeout adds its scope)."""
        return type(self).__name__

    def on_build(self, pipeline: Pipeline) -> None:  # noqa: B027 (a hook: by default a layer reads nothing)
        """Called once by each pipeline this layer is built into; read the stack with ``pipeline.layers_around``."""

    def emit(self, call: Call, kind: type[Event], /, **fields: Any) -> None:
        """Deliver a ``kind`` event about ``call`` with this layer's name; nothing is built when no one listens."""
        runtime = call.runtime
        listeners = runtime.listeners
        if listeners:  # built here, not through emit_event: one call and one keyword packing less per event
            deliver(listeners, kind(pipeline=runtime.name, layer=self.name, time=runtime.clock.now(), **fields))

    def snapshot(self) -> object | None:
        """The layer's observable state now (a frozen dataclass), or None for a stateless layer."""
        return None

    def health(self) -> LayerHealth | None:
        """The layer's status for :meth:`Pipeline.health`, or None when it has nothing to report."""
        return None

    def describe(self) -> dict[str, Any]:
        """``{"layer": class, "name": label, "options": {...}}`` plus :meth:`describe_state`: enough to rebuild it."""
        return {
            "layer": type(self).__name__,
            "name": self.name,
            "options": self.dump_options(),
            **self.describe_state(),
        }

    def dump_options(self, exclude: frozenset[str] = frozenset()) -> dict[str, Any]:
        """The options as ``describe()`` shows them: the model's dump, a shared store by its own ``describe()``
        (no secrets) in its place, ``exclude``'d fields left out for the layer to show its own way."""
        dumped = self.options.model_dump(exclude=set(exclude))
        store = getattr(self.options, "store", None)
        if "store" in dumped and store is not None:
            dumped["store"] = store.describe()
        return dumped

    def describe_state(self) -> dict[str, Any]:
        """What ``describe()`` adds to the options: what placement decided (a Timeout's scope), never secrets."""
        return {}


def roles(layers: tuple[Any, ...]) -> frozenset[str]:
    """The ``placement`` roles among ``layers`` (one side of :meth:`Pipeline.layers_around`)."""
    return frozenset(role for layer in layers if isinstance(role := getattr(type(layer), "placement", None), str))
