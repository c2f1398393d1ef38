"""The pipeline: a program wrapped in middleware layers, composed once when it is built.

A middleware is any object with ``async def __call__(self, call: Call, next: Handler) -> Any``; ``next``
runs the rest of the stack. The first layer listed is the outermost (as in Polly and tower).

Part of the core (docs/architecture.md: the layout, a call's path, the rules).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
from collections.abc import AsyncGenerator, Hashable
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel

from resilient_dspy.binding.targets import Target, adapt_target, is_dspy_program
from resilient_dspy.core import batch
from resilient_dspy.core.call import Call, CallRecord, Handler, Middleware, Runtime
from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.core.compose import check_arguments, compose
from resilient_dspy.core.health import LayerHealth, PipelineHealth, worst
from resilient_dspy.core.nested import PipelineTarget
from resilient_dspy.core.outcome import Outcome
from resilient_dspy.core.placement import warn_about_order
from resilient_dspy.core.portal import BackgroundLoop
from resilient_dspy.core.trace import Trace, traced
from resilient_dspy.errors import ConfigurationError, ErrorKind, InvalidInputError, classify
from resilient_dspy.events import Event, Listener, OfKinds, listener_problem

if TYPE_CHECKING:
    from resilient_dspy.core.dspy_module import ResilientModule

__all__ = ["Outcome", "Pipeline", "PipelineTarget", "adapt_program", "innermost_program"]

logger = logging.getLogger("resilient_dspy.pipeline")


class Pipeline:
    """A program wrapped in middleware; ``await pipeline("question")`` or ``await pipeline(question=...)``."""

    def __init__(
        self,
        program: Any,
        *middleware: Middleware,
        name: str | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        listeners: tuple[Listener, ...] | list[Listener] = (),
    ) -> None:
        problems: list[tuple[str, str]] = []
        target = adapt_program(program, problems)
        listeners = check_arguments(middleware, clock, rng, listeners, problems, is_program=_is_program)
        if problems or target is None:
            raise ConfigurationError(problems)
        warn_about_order(middleware)

        self.program = program
        self.layers: tuple[Middleware, ...] = tuple(middleware)
        self.name = name or target.name
        self._target: Target = target
        self._all_inputs = frozenset(target.input_fields)  # all of them, nothing else: always valid (the fast path)
        self._runtime = Runtime(self.name, clock or LoopClock(), rng or random.Random(), tuple(listeners))
        self.portal = BackgroundLoop(f"resilient-dspy {self.name}")  # where sync() calls run; started on first use
        self._handler = compose(target, self.layers)
        self._traced_handler: Handler | None = None
        self._mistake: BaseException | None = None  # the last user mistake, until a call succeeds (health)
        self._mistakes_logged: set[type[BaseException]] = set()
        self.program_source: dict[str, Any] | None = None
        """The config table the program was built from (set by :meth:`from_config`); ``describe()`` shows it."""
        for layer in self.layers:
            on_build = getattr(layer, "on_build", None)
            if on_build is not None:
                on_build(self)

    @classmethod
    def from_config(cls, source: Any, *, environment: bool = True) -> Pipeline:
        """A pipeline from a TOML/YAML/JSON file, a dict, or a ``describe()`` list, environment overrides applied
        (``environment=False`` skips them); one ConfigurationError lists every bad field (docs: configuration)."""
        from resilient_dspy.config.build import build_pipeline

        return build_pipeline(cls, source, environment=environment)

    @property
    def target(self) -> Target:
        """The adapter around the wrapped program (its input fields, its LMs)."""
        return self._target

    @property
    def runtime(self) -> Runtime:
        """The name, clock, randomness and listeners every call of this pipeline carries."""
        return self._runtime

    @property
    def clock(self) -> Clock:
        return self._runtime.clock

    @property
    def input_fields(self) -> tuple[str, ...]:
        return self._target.input_fields

    def subscribe(self, listener: Listener, *, to: type[Event] | tuple[type[Event], ...] = ()) -> None:
        """Add an event listener (a sync callable taking one :class:`Event`; wrap an async one in AsyncListener).

        ``to`` narrows it to events of those types (their subclasses included), e.g. ``to=Rejected``; to route
        several types to several handlers, subscribe an :class:`~resilient_dspy.events.EventRouter`.
        """
        problem = listener_problem(listener)
        kinds = to if isinstance(to, tuple) else (to,)
        if problem is None and not all(isinstance(kind, type) and issubclass(kind, Event) for kind in kinds):
            problem = f"to= must be Event subclasses (got {to!r:.80})"
        if problem is not None:
            raise ConfigurationError([("listener", problem)])
        if kinds:
            listener = OfKinds(listener, kinds)
        self._runtime = dataclasses.replace(self._runtime, listeners=(*self._runtime.listeners, listener))

    def layers_around(self, layer: Middleware) -> tuple[tuple[Middleware, ...], tuple[Middleware, ...]]:
        """The layers listed before (outside) and after (inside) ``layer``: how a layer's ``on_build`` reads its place.

        Read what a neighbour declares (its class's ``placement`` role, see :func:`~resilient_dspy.core.layer.roles`,
        or ``coalesces``), never its type, so a layer of one's own can take any role.
        """
        for index, candidate in enumerate(self.layers):
            if candidate is layer:
                return self.layers[:index], self.layers[index + 1 :]
        raise ValueError(f"{layer!r} is not a layer of {self!r}")

    def inputs_of(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """The program's keyword inputs for a call made as ``pipeline(*args, **kwargs)`` (positionals mapped to names;
        the names are not checked here, as a cache key or a test may be built for any inputs; a call checks them)."""
        return self._inputs(args, kwargs, check=False)

    def _inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any], check: bool = True) -> dict[str, Any]:
        if not args:
            if check and kwargs.keys() != self._all_inputs:
                self._check_inputs(kwargs)
            return kwargs
        fields = self._target.input_fields
        if len(args) > len(fields):
            raise TypeError(f"{self.name} takes {len(fields)} positional input(s) {list(fields)}, got {len(args)}")
        inputs = dict(zip(fields, args, strict=False))
        clash = inputs.keys() & kwargs.keys()
        if clash:
            raise TypeError(f"{self.name} got input(s) {sorted(clash)} both positionally and by keyword")
        inputs.update(kwargs)
        if check and inputs.keys() != self._all_inputs:
            self._check_inputs(inputs)
        return inputs

    def _check_inputs(self, inputs: dict[str, Any]) -> None:
        """Refuse an unknown input name or a missing required one, before any layer runs (not the fast path)."""
        problems = self._target.input_problems(inputs)
        if problems:
            field, rule = problems[0]
            raise InvalidInputError(field, rule, problems=problems)

    def new_call(
        self,
        inputs: dict[str, Any],
        *,
        deadline: float | None = None,
        properties: dict[str, Any] | None = None,
        partition_key: Hashable | None = None,
        bypass_cache: bool = False,
    ) -> Call:
        """A fresh :class:`Call` for ``inputs`` on this pipeline's runtime; run it with :meth:`run`."""
        runtime = self._runtime
        return Call(
            inputs,
            runtime,
            CallRecord(runtime.clock.now()),
            deadline=deadline,
            bypass_cache=bypass_cache,
            partition_key=partition_key,
            properties={} if properties is None else properties,
        )

    async def run(self, call: Call) -> Any:
        """Run an already-built call through the stack."""
        try:
            value = await self._handler(call)
        except Exception as error:
            self._failed(error)
            raise
        if self._mistake is not None:
            self._mistake = None
        return value

    def _failed(self, error: Exception) -> None:
        """Note a user mistake (a configuration or programming error) for health(), logging it once per type."""
        if classify(error).kind is not ErrorKind.USER_MISTAKE:
            return
        self._mistake = error
        kind = type(error)
        if kind not in self._mistakes_logged:
            self._mistakes_logged.add(kind)
            logger.error(
                "pipeline %r: %s is a configuration or programming error: it is not retried and no fallback "
                "serves it, so every such call fails until it is fixed (logged once per error type): %s",
                self.name,
                kind.__name__,
                error,
                exc_info=error,
            )

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # new_call inlined: its keyword defaults cost a few hundred ns on every call
        if args:
            kwargs = self._inputs(args, kwargs)
        elif kwargs.keys() != self._all_inputs:
            self._check_inputs(kwargs)
        runtime = self._runtime
        return await self.run(Call(kwargs, runtime, CallRecord(runtime.clock.now())))

    def sync(self, *args: Any, **kwargs: Any) -> Any:
        """``await pipeline(...)`` for sync code, from any thread: run on :attr:`portal`, one loop for every caller."""
        return self.portal.call(self, *args, **kwargs)

    def as_module(self) -> ResilientModule:
        """This pipeline as a ``dspy.Module``: for optimizers, Evaluate, save/load, streamify, sync and async calls."""
        from resilient_dspy.core.dspy_module import ResilientModule

        return ResilientModule(self)

    async def invoke(self, *args: Any, **kwargs: Any) -> Outcome:
        """Like calling the pipeline, but returns an :class:`Outcome` (which alternative served, attempts, …)."""
        call = self.new_call(self._inputs(args, kwargs))
        value = await self.run(call)
        record = call.record
        return Outcome(
            value,
            record.served_by,
            record.attempts,
            record.retries,
            self._runtime.clock.now() - record.started_at,
            hedges=record.hedges,
            served_hedge=record.served_hedge,
        )

    async def traced(self, *args: Any, **kwargs: Any) -> Outcome:
        """Like :meth:`invoke`, and ``outcome.trace`` holds every layer's span and event (see :mod:`.trace`).

        On failure the error carries the trace too, as ``error.trace``, so a failed call can be debugged; an error
        that refuses the attribute (a frozen dataclass) is raised as it is, without it.
        """
        runtime = self._runtime
        trace = Trace(self.name, runtime.clock.now())
        call = self.new_call(self._inputs(args, kwargs))
        call.runtime = dataclasses.replace(runtime, listeners=(*runtime.listeners, trace.add_event))
        call.record.trace = trace
        handler = self._traced_handler
        if handler is None:
            handler = self._traced_handler = self._traced_chain()
        try:
            value = await handler(call)
        except Exception as error:
            self._failed(error)
            trace.close(trace.root, runtime.clock.now(), error)
            # a frozen dataclass or a read-only ``trace`` refuses it: the caller still gets its own error, untraced
            with contextlib.suppress(Exception):
                error.trace = trace  # type: ignore[attr-defined]
            raise
        except BaseException as error:
            trace.close(trace.root, runtime.clock.now(), error)
            raise
        if self._mistake is not None:
            self._mistake = None
        now = runtime.clock.now()
        trace.close(trace.root, now)
        record = call.record
        return Outcome(
            value,
            record.served_by,
            record.attempts,
            record.retries,
            now - record.started_at,
            trace,
            hedges=record.hedges,
            served_hedge=record.served_hedge,
        )

    async def map(
        self,
        inputs: batch.Inputs,
        *,
        concurrency: int = batch.DEFAULT_CONCURRENCY,
        progress: batch.Progress = False,
        return_exceptions: bool = True,
        total: int | None = None,
    ) -> list[Outcome]:
        """Run every input (a question, a dict of inputs, a ``dspy.Example``), ``concurrency`` calls at a time: one
        :class:`Outcome` per input, in input order, a failure's with its typed ``error`` (see :mod:`.batch`)."""
        return await batch.map(
            self, inputs, concurrency=concurrency, progress=progress, return_exceptions=return_exceptions, total=total
        )

    def imap(
        self,
        inputs: batch.Inputs,
        *,
        concurrency: int = batch.DEFAULT_CONCURRENCY,
        progress: batch.Progress = False,
        return_exceptions: bool = True,
        total: int | None = None,
    ) -> AsyncGenerator[tuple[int, Outcome], None]:
        """Like :meth:`map`, but yields ``(index, outcome)`` as each call finishes: memory stays flat at any size."""
        return batch.imap(
            self, inputs, concurrency=concurrency, progress=progress, return_exceptions=return_exceptions, total=total
        )

    def _traced_chain(self) -> Handler:
        return compose(traced(f"program {self._target.name}", self._target), self.layers, traced)

    def health(self) -> PipelineHealth:
        """Every stateful layer's status (breaker states, saturation, hit rate, budget left) and readiness.

        After a user mistake (a configuration or programming error, see :mod:`.errors`) a ``program`` report says
        ``down``, naming the error, until a later call succeeds: every call fails the same way until it is fixed.
        """
        reports = []
        for layer in self.layers:
            report = getattr(layer, "health", None)
            if report is not None and (health := report()) is not None:
                reports.append(health)
        mistake = self._mistake
        if mistake is not None:
            reports.append(
                LayerHealth(
                    "program",
                    "down",
                    {"error": f"{type(mistake).__name__}: {mistake}", "kind": ErrorKind.USER_MISTAKE.value},
                )
            )
        return PipelineHealth(self.name, worst(r.status for r in reports), tuple(reports))

    def describe(self) -> list[dict[str, Any]]:
        """The layers, outermost first, with their options, then the wrapped program."""
        described = []
        for layer in self.layers:
            describe = getattr(layer, "describe", None)
            if describe is not None:
                described.append(describe())
            else:
                options = getattr(layer, "options", None)
                dump = options.model_dump() if isinstance(options, BaseModel) else {}
                described.append({"layer": type(layer).__name__, "options": dump})
        program = self._target.describe()
        if self.program_source is not None:
            program = {**program, "source": dict(self.program_source)}
        described.append(program)
        return described

    def __repr__(self) -> str:
        layers = ", ".join(type(layer).__name__ for layer in self.layers)
        return f"Pipeline({self._target.name}{', ' if layers else ''}{layers})"


def _is_program(layer: Any) -> bool:
    return isinstance(layer, Pipeline) or is_dspy_program(layer)


def adapt_program(program: Any, problems: list[tuple[str, str]]) -> Target | None:
    """The :class:`~resilient_dspy.binding.targets.Target` for ``program`` (a nested Pipeline included), or None with
    the reason appended to ``problems``."""
    if isinstance(program, Pipeline):
        return PipelineTarget(program)
    return adapt_target(program, problems)


def innermost_program(program: Any) -> Any:
    """What ``program`` finally runs: itself, or for a (nested) Pipeline the program inside every Pipeline."""
    while isinstance(program, Pipeline):
        program = program.program
    return program
