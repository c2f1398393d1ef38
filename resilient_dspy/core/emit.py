"""Events built where there is a runtime but no Layer (a circuit object, a partition): the pipeline's name, the
layer's name and the pipeline clock's time are filled in here, as :meth:`resilient_dspy.core.layer.Layer.emit`
does for a layer, so a layer writes only what is its own."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from resilient_dspy.events import deliver

if TYPE_CHECKING:
    from resilient_dspy.core.call import Runtime
    from resilient_dspy.events import Event

__all__ = ["emit_event"]


def emit_event(runtime: Runtime, layer: str, kind: type[Event], /, **fields: Any) -> None:
    """Build a ``kind`` event for ``layer`` of the pipeline ``runtime`` belongs to and deliver it to its listeners."""
    listeners = runtime.listeners
    if listeners:
        deliver(listeners, kind(pipeline=runtime.name, layer=layer, time=runtime.clock.now(), **fields))
