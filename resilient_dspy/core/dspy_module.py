"""A pipeline as a ``dspy.Module`` (``pipeline.as_module()``): what DSPy's optimizers, ``Evaluate``, ``Parallel``,
``save``/``load`` and ``streamify`` expect, with every call still going through the layers.

- Its parameters and its state are the wrapped program's, under the program's own names (a ``ChainOfThought``'s
  ``"predict"``, not ``"program.predict"``), so an optimizer compiles the wrapped program, and a state saved from
  the module loads into the bare program and back.
- ``module(...)`` from sync code runs on the pipeline's background loop (:mod:`.portal`); ``await module.acall(...)``
  runs on the caller's loop. Under ``dspy.streamify`` a call streams through the layers (:mod:`.stream`).
- A copy (``deepcopy``, ``reset_copy``, what optimizers make) copies the program and rebuilds the pipeline around
  the copy. The layers model what is outside the program — a provider's quota, a spend cap, a model's health, the
  concurrency one may use — so copies share them, and a quota never doubles: a layer is shared unless it defines
  ``for_copy()``, which gives the copy its own (the ``Cache``: its keys name the copy's predictors, and its backend,
  where the answers are, is shared). Per copy and fresh: the program, its demos and history, the pipeline's record
  of user mistakes, a forward-only program's thread bound. No lock is copied: shared layers are not copied at all.
- ``pickle`` (``save(..., save_program=True)``) is refused: live layer state (locks, loops, backends) means nothing
  in another process. Save the state (``module.save("program.json")``), or the program, and wrap it again.
"""

from __future__ import annotations

import asyncio
import copy
from typing import TYPE_CHECKING, Any

import dspy

from resilient_dspy.binding.settings import setting
from resilient_dspy.core.stream import consumer_loop, run_streamed

if TYPE_CHECKING:
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["ResilientModule", "pipeline_for_copy"]


def _innermost(pipeline: Pipeline) -> Any:
    program = pipeline.program
    while isinstance(program, type(pipeline)):
        program = program.program
    return program


def pipeline_for_copy(pipeline: Pipeline, program: Any) -> Pipeline:
    """The same stack around ``program`` (a copy of the wrapped program): layers shared, or their ``for_copy()``;
    the same name, clock, randomness, listeners and background loop."""
    kind = type(pipeline)
    inner = pipeline.program
    inner = pipeline_for_copy(inner, program) if isinstance(inner, kind) else program
    layers = [layer.for_copy() if hasattr(layer, "for_copy") else layer for layer in pipeline.layers]
    runtime = pipeline.runtime
    rebuilt = kind(
        inner, *layers, name=pipeline.name, clock=runtime.clock, rng=runtime.rng, listeners=runtime.listeners
    )
    rebuilt.portal = pipeline.portal
    return rebuilt


class ResilientModule(dspy.Module):  # type: ignore[misc]
    """``pipeline`` as a ``dspy.Module``: ``program`` is the wrapped program, ``pipeline`` the stack around it."""

    def __init__(self, pipeline: Pipeline) -> None:
        super().__init__()
        self.program = _innermost(pipeline)
        self.pipeline = pipeline

    def named_parameters(self) -> list[tuple[str, Any]]:
        """The wrapped program's parameters, under its own names (what optimizers, save and load read)."""
        program = self.program
        return program.named_parameters() if isinstance(program, dspy.BaseModule) else []

    def dump_state(self, json_mode: bool = True) -> Any:
        """The wrapped program's state, as the program itself saves it: a saved file loads into either."""
        return self.program.dump_state(json_mode=json_mode)

    def load_state(self, state: Any, *, allow_unsafe_lm_state: bool = False) -> ResilientModule:
        """Load a state saved from this module or from the bare program into the wrapped program."""
        self.program.load_state(state, allow_unsafe_lm_state=allow_unsafe_lm_state)
        return self

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """A sync call: on the pipeline's background loop; streamed when ``dspy.streamify`` runs it."""
        consumer = setting("send_stream")
        if consumer is None:
            return self.pipeline.sync(*args, **kwargs)
        loop = consumer_loop()
        return self.pipeline.portal.call(run_streamed, self.pipeline, args, kwargs, consumer, loop)

    async def aforward(self, *args: Any, **kwargs: Any) -> Any:
        """An async call (through ``acall``): on the caller's loop; streamed under ``dspy.streamify``."""
        consumer = setting("send_stream")
        if consumer is None:
            return await self.pipeline(*args, **kwargs)
        return await run_streamed(self.pipeline, args, kwargs, consumer, asyncio.get_running_loop())

    def __deepcopy__(self, memo: dict[int, Any]) -> ResilientModule:
        program = self.program
        try:
            program = copy.deepcopy(program, memo)
        except Exception:  # what DSPy does too: a module with an uncopyable attribute is copied parameter by parameter
            if not isinstance(program, dspy.BaseModule):
                raise
            program = program.deepcopy()
        twin: ResilientModule = object.__new__(type(self))
        memo[id(self)] = twin
        for name, value in self.__dict__.items():
            if name not in ("program", "pipeline", "history", "callbacks"):
                twin.__dict__[name] = copy.deepcopy(value, memo)
        twin.program = program
        twin.pipeline = pipeline_for_copy(self.pipeline, program)
        twin.history = []
        twin.callbacks = list(self.callbacks)
        return twin

    def __copy__(self) -> ResilientModule:
        twin: ResilientModule = object.__new__(type(self))
        twin.__dict__.update(self.__dict__)
        return twin

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError(
            "a ResilientModule holds live layer state (locks, an event loop, cache backends) that cannot be pickled: "
            "save its state with module.save('program.json') (or .pkl) and load it into a new "
            "pipeline.as_module(), or save the wrapped program (module.program) and wrap it again"
        )

    def __repr__(self) -> str:
        return f"ResilientModule({self.pipeline!r})"
