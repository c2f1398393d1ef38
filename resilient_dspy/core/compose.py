"""How a pipeline is put together: its arguments checked (every problem at once), and its layers bound around the
target once, so a call costs one function call per layer.

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable
from typing import Any

from resilient_dspy.core.call import Call, Handler, Middleware
from resilient_dspy.core.clock import Clock
from resilient_dspy.events import Listener, listener_problem

__all__ = ["check_arguments", "compose", "layer_label"]


def check_arguments(
    middleware: tuple[Any, ...],
    clock: Any,
    rng: Any,
    listeners: Any,
    problems: list[tuple[str, str]],
    *,
    is_program: Callable[[Any], bool],
) -> tuple[Listener, ...]:
    """Append to ``problems`` what is wrong with a pipeline's layers, clock, rng and listeners; the listeners to use."""
    for index, layer in enumerate(middleware):
        if is_program(layer):
            problems.append(
                (
                    f"middleware[{index}]",
                    f"is a program ({type(layer).__name__}), not a middleware layer: the program comes first, "
                    "then the layers, as in Pipeline(program, *layers)",
                )
            )
        elif isinstance(layer, type) or not (callable(layer) and inspect.iscoroutinefunction(layer.__call__)):
            problems.append(
                (
                    f"middleware[{index}]",
                    f"must be a middleware instance with 'async def __call__(self, call, next)' (got {layer!r:.80})",
                )
            )
    if clock is not None and not isinstance(clock, Clock):
        problems.append(("clock", f"must implement now(), sleep() and deadline() (got {clock!r})"))
    if rng is not None and not isinstance(rng, random.Random):
        problems.append(("rng", f"must be a random.Random, e.g. random.Random(seed) (got {rng!r:.80})"))
    if not isinstance(listeners, list | tuple):
        problems.append(("listeners", f"must be a list or tuple of callables (got {listeners!r:.80})"))
        return ()
    for index, listener in enumerate(listeners):
        problem = listener_problem(listener)
        if problem is not None:
            problems.append((f"listeners[{index}]", problem))
    return tuple(listeners)


def layer_label(layer: Any) -> str:
    """A layer's name in traces: its ``name`` when it has one, else its class (with a Timeout-like ``scope``)."""
    value = getattr(layer, "name", None)
    if isinstance(value, str) and value:
        return value
    scope = getattr(layer, "scope", None)
    kind = type(layer).__name__
    return f"{kind}({scope})" if isinstance(scope, str) else kind


def compose(
    target: Handler, layers: tuple[Middleware, ...], wrap: Callable[[str, Handler], Handler] | None = None
) -> Handler:
    """The handler that runs ``layers`` (outermost first) around ``target``; ``wrap`` (a tracer) wraps each one."""
    handler = target
    for layer in reversed(layers):
        handler = _bind(layer, handler)
        if wrap is not None:
            handler = wrap(layer_label(layer), handler)
    return handler


def _bind(layer: Middleware, next_handler: Handler) -> Handler:
    def handler(call: Call) -> Awaitable[Any]:
        return layer(call, next_handler)

    return handler
