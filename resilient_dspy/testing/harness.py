"""Run many calls through a pipeline and record what the invariants need: results, timings, events, journals.

Every call runs in its own task with :data:`current_call` set, so events (delivered synchronously in the caller's
task), program journal entries and DSPy's "missing input" warnings are attributed to the call that caused them.
Every input field of the program gets a value (see :func:`input_values`). Timing uses the pipeline's clock: run it
on a ``looptime`` loop for virtual time, or on a real loop with small latencies. Only the loop-lag monitor reads the
real clock, because blocking (a ``time.sleep`` in an async program) is invisible to virtual time.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import logging
import math
import random
import time
import types
import typing
import warnings
from collections import defaultdict, deque
from collections.abc import Iterable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any, TypeVar

import dspy

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ResilienceWarning
from resilient_dspy.events import Event
from resilient_dspy.faults import Fault, FaultStep, ScriptEntry, fault_error, parse_steps
from resilient_dspy.middleware.breaker import CircuitBreaker
from resilient_dspy.middleware.bulkhead import Bulkhead
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.fallback import Fallback, Static
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter
from resilient_dspy.middleware.retry import Retry
from resilient_dspy.middleware.timeout import Timeout

__all__ = [
    "Built",
    "CallResult",
    "Checkpoint",
    "EventRecorder",
    "ProgramEntry",
    "RecordedEvent",
    "Run",
    "ScriptedProgram",
    "StackConfig",
    "current_call",
    "input_values",
    "run_calls",
]

current_call: ContextVar[int | None] = ContextVar("resilient_dspy_harness_call", default=None)
current_recorder: ContextVar[EventRecorder | None] = ContextVar("resilient_dspy_harness_recorder", default=None)
"""The run's event recorder, so a :class:`Checkpoint` entry knows which events came before it (same-instant order)."""
"""The harness index of the call the current task runs (None outside a harness call)."""

E = TypeVar("E", bound=Event)


@dataclass(frozen=True, slots=True)
class CallResult:
    """One call as its caller saw it: when it ran, what it returned or raised, and what the pipeline recorded."""

    index: int
    question: str
    started: float
    ended: float
    value: Any = None
    error: BaseException | None = None
    cancel_requested: bool = False
    hung: bool = False
    attempts: int = 0
    retries: int = 0
    served_by: str = "primary"
    missing_inputs: tuple[str, ...] = ()

    @property
    def duration(self) -> float:
        return self.ended - self.started

    @property
    def ok(self) -> bool:
        return self.error is None and not self.hung

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, asyncio.CancelledError)


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    """An event and the harness call whose task emitted it (None when emitted outside any harness call)."""

    call: int | None
    event: Event


class EventRecorder:
    """A pipeline listener that keeps every event with the harness call that emitted it."""

    def __init__(self) -> None:
        self.events: list[RecordedEvent] = []

    def __call__(self, event: Event) -> None:
        self.events.append(RecordedEvent(current_call.get(), event))

    def of_type(self, kind: type[E]) -> list[tuple[int | None, E]]:
        """``(call, event)`` for every recorded event of ``kind``, in order."""
        return [(r.call, r.event) for r in self.events if isinstance(r.event, kind)]


@dataclass(slots=True)
class ProgramEntry:
    """One run of the program (or one passage through a :class:`Checkpoint`): its call, question, fault (None at
    a checkpoint), start and end times, and how it ended."""

    call: int | None
    question: str
    fault: Fault | None
    started: float
    ended: float = math.inf
    error: BaseException | None = None
    cancelled: bool = False
    reached: bool | None = None  # at a checkpoint: whether the call reached the program below it (None: unknown)
    events_before: int | None = None  # at a checkpoint: how many of the run's events were recorded when it started

    @property
    def finished(self) -> bool:
        return self.ended != math.inf


class ScriptedProgram:
    """A fast ``async def (question)`` program for fault-injection tests: each run does the next scripted fault.

    Runs take steps from ``script`` in start order, then ``default``. Errors are exactly what DSPy raises for each
    fault (:func:`fault_error`), a ``hang`` waits until cancelled, latency sleeps on ``clock``. ``journal`` holds
    every run with its harness call; ``max_in_flight`` the highest concurrency seen.
    """

    def __init__(
        self, script: Iterable[ScriptEntry] = (), *, default: ScriptEntry = None, clock: Clock | None = None
    ) -> None:
        self.script: deque[FaultStep] = deque(parse_steps(script, "ScriptedProgram.script"))
        self.default = parse_steps([default], "ScriptedProgram.default")[0]
        self.clock = clock or LoopClock()
        self.journal: list[ProgramEntry] = []
        self.in_flight = 0
        self.max_in_flight = 0

    def push(self, *steps: ScriptEntry) -> None:
        self.script.extend(parse_steps(steps, "ScriptedProgram.push"))

    async def __call__(self, question: str) -> dspy.Prediction:
        step = self.script.popleft() if self.script else self.default
        entry = ProgramEntry(current_call.get(), question, step.fault, self.clock.now())
        self.journal.append(entry)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if step.latency:
                await self.clock.sleep(step.latency)
            if step.fault is Fault.HANG:
                await asyncio.Event().wait()
            error = fault_error(step.fault, retry_after=step.retry_after, status=step.status)
            if error is not None:
                entry.error = error
                raise error
            return dspy.Prediction(answer=f"answer to {question}")
        except asyncio.CancelledError:
            entry.cancelled = True
            raise
        finally:
            self.in_flight -= 1
            entry.ended = self.clock.now()


class Checkpoint:
    """A middleware that journals every call passing it (start, end, error): place it below a layer to see exactly
    what that layer let through, e.g. admissions below a RateLimiter or probes below a CircuitBreaker.

    With ``follows_leases=True`` (below a Bulkhead) a call's passage pauses while it lends its permit (a Cache's
    single-flight follower waiting, see :class:`~resilient_dspy.core.call.Lease`): the journal then holds the spans
    during which the call held a permit, one entry each."""

    def __init__(self, name: str = "Checkpoint", *, follows_leases: bool = False) -> None:
        self.name = name
        self.follows_leases = follows_leases
        self.journal: list[ProgramEntry] = []

    async def __call__(self, call: Call, next: Handler) -> Any:
        values = list(call.inputs.values())
        span = _Span(self, call, str(values[0]) if values else "")
        attempts = call.record.attempts
        leases = None
        if self.follows_leases:
            leases = call.record.leases
            if leases is None:
                leases = call.record.leases = []
            leases.append(span)
        try:
            return await next(call)
        except asyncio.CancelledError:
            span.entry.cancelled = True
            raise
        except Exception as error:
            span.entry.error = error
            raise
        finally:
            if span.held:
                span.entry.ended = call.clock.now()
            span.entry.reached = call.record.attempts != attempts
            if leases is not None:
                leases.remove(span)


class _Span:
    """A call's passage through a :class:`Checkpoint` as a lease: lending ends its journal entry, reclaiming
    starts the next one."""

    __slots__ = ("call", "checkpoint", "entry", "held", "question")

    def __init__(self, checkpoint: Checkpoint, call: Call, question: str) -> None:
        self.checkpoint = checkpoint
        self.call = call
        self.question = question
        self.held = True
        self.entry = self._start()

    def _start(self) -> ProgramEntry:
        entry = ProgramEntry(current_call.get(), self.question, None, self.call.clock.now())
        recorder = current_recorder.get()
        entry.events_before = None if recorder is None else len(recorder.events)
        self.checkpoint.journal.append(entry)
        return entry

    def lend(self) -> None:
        if self.held:
            self.held = False
            self.entry.ended = self.call.clock.now()

    async def reclaim(self, call: Call) -> None:
        if not self.held:
            self.held = True
            self.entry = self._start()


@dataclass(frozen=True, slots=True)
class StackConfig:
    """A pipeline configuration in the recommended order, built fresh (new layer instances) by :meth:`build`.

    Fallback(Static) ▶ Timeout(total) ▶ RateLimiter ▶ Retry ▶ CircuitBreaker ▶ Bulkhead ▶ Timeout(attempt) ▶
    Cache ▶ program; each layer is present when its options are given. Checkpoints are placed right below the
    limiter, the breaker and the bulkhead so the invariants can see what each let through.
    """

    total_timeout: float | None = None
    limiter: tuple[Limit, ...] = ()
    limiter_max_wait: float | None = None
    retry: Mapping[str, Any] | None = None
    breaker: Mapping[str, Any] | None = None
    bulkhead: Mapping[str, Any] | None = None
    attempt_timeout: float | None = None
    cache_ttl: float | None = None
    cache: bool = False
    fallback: bool = False

    def build(
        self, program: Any, *, clock: Clock | None = None, rng: random.Random | None = None, name: str = "chaos"
    ) -> Built:
        layers: list[Any] = []
        found: dict[str, Any] = {}
        if self.fallback:
            found["fallback"] = Fallback(Static(answer="fallback"))
            layers.append(found["fallback"])
        if self.total_timeout is not None:
            layers.append(Timeout(self.total_timeout))
        if self.limiter:
            found["limiter"] = RateLimiter(*self.limiter, max_wait=self.limiter_max_wait)
            found["admitted"] = Checkpoint("admitted")
            layers += [found["limiter"], found["admitted"]]
        if self.retry is not None:
            found["retry"] = Retry(**self.retry)
            layers.append(found["retry"])
        if self.breaker is not None:
            found["breaker"] = CircuitBreaker(**self.breaker)
            found["probed"] = Checkpoint("probed")
            layers += [found["breaker"], found["probed"]]
        if self.bulkhead is not None:
            found["bulkhead"] = Bulkhead(**self.bulkhead)
            found["running"] = Checkpoint("running", follows_leases=True)  # a follower's wait holds no permit
            layers += [found["bulkhead"], found["running"]]
        if self.attempt_timeout is not None:
            layers.append(Timeout(self.attempt_timeout))
        if self.cache:
            found["cache"] = Cache(ttl=self.cache_ttl)
            layers.append(found["cache"])
        with warnings.catch_warnings():  # any stack, on purpose: an order the pipeline would warn about included
            warnings.filterwarnings("ignore", message="layer order", category=ResilienceWarning)
            pipeline = Pipeline(program, *layers, clock=clock, rng=rng or random.Random(0), name=name)
        return Built(self, pipeline, found)


@dataclass(frozen=True, slots=True)
class Built:
    """A built :class:`StackConfig`: the pipeline and its named layers and checkpoints (``layers["breaker"]``...)."""

    config: StackConfig
    pipeline: Pipeline
    layers: Mapping[str, Any]

    def checkpoint(self, name: str) -> list[ProgramEntry]:
        """The journal of the checkpoint ``name`` (``admitted``, ``probed``, ``running``), empty when absent."""
        point = self.layers.get(name)
        return point.journal if isinstance(point, Checkpoint) else []


@dataclass(slots=True)
class Run:
    """Everything one :func:`run_calls` recorded."""

    calls: list[CallResult]
    events: list[RecordedEvent]
    orphans: list[str]
    started: float
    ended: float
    horizon: float
    extra: dict[str, Any] = field(default_factory=dict)
    longest_block: float = 0.0
    """The longest the event loop went without running anything else, in real seconds (a blocking call)."""
    blocked_at: float | None = None
    """When (pipeline clock) the longest block ended; None when nothing blocked the loop."""

    def of_type(self, kind: type[E]) -> list[tuple[int | None, E]]:
        return [(r.call, r.event) for r in self.events if isinstance(r.event, kind)]

    @property
    def questions(self) -> dict[str, int]:
        """Question → call index (questions are unique per run)."""
        return {c.question: c.index for c in self.calls}


def _input_annotations(program: Any) -> dict[str, Any]:
    """The declared type of each input field of ``program`` (a DSPy signature's, else its parameters' hints)."""
    if isinstance(program, Pipeline):
        return _input_annotations(program.program)
    signatures = [getattr(program, "signature", None)]
    if isinstance(program, dspy.Module):
        signatures += [predictor.signature for predictor in program.predictors()]
    found: dict[str, Any] = {}
    for signature in signatures:
        for name, info in (getattr(signature, "input_fields", None) or {}).items():
            found.setdefault(name, info.annotation)
    function = getattr(type(program), "forward", None) if isinstance(program, dspy.Module) else program
    if function is not None:
        try:
            hints = typing.get_type_hints(function)
        except Exception:  # unresolvable string annotations: fall back to what inspect shows
            hints = {name: p.annotation for name, p in inspect.signature(function).parameters.items()}
        for name, hint in hints.items():
            found.setdefault(name, hint)
    return found


def _value_of(annotation: Any, text: str, index: int) -> Any:
    """A value of ``annotation`` (str, int, float, bool, a list/dict/Literal/Optional of those), else ``text``."""
    origin = typing.get_origin(annotation)
    args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
    if origin is typing.Literal and args:
        return args[index % len(args)]
    if origin in (typing.Union, types.UnionType) and args:
        return _value_of(args[0], text, index)
    if annotation is bool:
        return index % 2 == 0
    if annotation is int:
        return index + 1
    if annotation is float:
        return index + 0.5
    if origin in (list, tuple, set, frozenset, Sequence) or annotation in (list, tuple):
        return [_value_of(args[0] if args else str, text, index)]
    if origin is dict or annotation is dict:
        return {"value": text}
    return text


def input_values(pipeline: Pipeline, question: str, index: int = 0, *, field: str | None = None) -> dict[str, Any]:
    """Every input field of ``pipeline``'s program for one call: ``question`` in ``field`` (default the first), a
    value of each other field's declared type (``"context: <question>"`` for text), so no field is left missing."""
    fields = pipeline.input_fields or ("question",)
    first = field or fields[0]
    annotations = _input_annotations(pipeline.program)
    values: dict[str, Any] = {first: question}
    for name in fields:
        if name != first:
            values[name] = _value_of(annotations.get(name, str), f"{name}: {question}", index)
    return values


_MISSING_INPUTS = "Not all input fields were provided to module"


class _MissingInputs(logging.Handler):
    """Collects DSPy's "Not all input fields were provided" warnings by harness call, with the missing names."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.by_call: dict[int | None, list[str]] = defaultdict(list)

    def emit(self, record: logging.LogRecord) -> None:
        if not str(record.msg).startswith(_MISSING_INPUTS):
            return
        args = record.args if isinstance(record.args, tuple) else ()
        missing = args[1] if len(args) == 2 and isinstance(args[1], list) else ["?"]
        names = self.by_call[current_call.get()]
        names.extend(str(name) for name in missing if str(name) not in names)


class _LoopLag:
    """A timer every ``tick`` loop seconds that keeps the longest real-time gap past the tick: how long the loop
    was blocked. Virtual time does not move while a callback blocks, so the real clock is the only witness."""

    def __init__(self, clock: Clock, tick: float = 0.1) -> None:
        self.clock = clock
        self.tick = tick
        self.longest = 0.0
        self.at: float | None = None
        self._last = 0.0
        self._handle: asyncio.TimerHandle | None = None

    def start(self) -> None:
        self._last = time.perf_counter()
        self._handle = asyncio.get_running_loop().call_later(self.tick, self._beat)

    def _beat(self) -> None:
        now = time.perf_counter()
        lag = now - self._last - self.tick
        if lag > self.longest:
            self.longest, self.at = lag, self.clock.now()
        self._last = now
        self._handle = asyncio.get_running_loop().call_later(self.tick, self._beat)

    def stop(self) -> None:
        self._beat()  # a block at the very end counts too
        if self._handle is not None:
            self._handle.cancel()


async def run_calls(
    pipeline: Pipeline,
    calls: int | Sequence[str | Mapping[str, Any]],
    *,
    arrivals: Sequence[float] | None = None,
    concurrency: int | None = None,
    cancel_after: Mapping[int, float] | None = None,
    horizon: float = 3600.0,
    field_name: str | None = None,
) -> Run:
    """Run ``calls`` (a count, the questions, or each call's inputs) through ``pipeline`` and record everything.

    A question fills every input field (:func:`input_values`; ``field_name`` puts it in that field instead of the
    first); a mapping is passed as the inputs, as is. ``arrivals`` are start offsets (seconds from the start;
    default all at once); ``concurrency`` bounds calls in flight; ``cancel_after[i]`` cancels call ``i`` that many
    seconds after it started, as a caller would. A call still running ``horizon`` seconds after the start is
    cancelled and marked ``hung`` (a lost call). DSPy's missing-input warnings land in ``missing_inputs`` of the
    call that logged them, and the longest real-time block of the loop in ``Run.longest_block``.
    """
    given = [f"q{i}" for i in range(calls)] if isinstance(calls, int) else list(calls)
    if arrivals is not None and len(arrivals) != len(given):
        raise ValueError(f"arrivals has {len(arrivals)} offsets for {len(given)} calls")
    inputs: list[dict[str, Any]] = []
    questions: list[str] = []
    for index, item in enumerate(given):
        if isinstance(item, Mapping):
            inputs.append(dict(item))
            questions.append(str(next(iter(item.values()), "")))
        else:
            inputs.append(input_values(pipeline, item, index, field=field_name))
            questions.append(item)
    loop = asyncio.get_running_loop()
    clock = pipeline.clock
    recorder = EventRecorder()
    runtime = pipeline.runtime
    listened = dataclasses.replace(runtime, listeners=(*runtime.listeners, recorder))
    gate = asyncio.Semaphore(concurrency) if concurrency else None
    missing = _MissingInputs()
    dspy_logger = logging.getLogger("dspy")
    lag = _LoopLag(clock)
    lag.start()
    before = set(asyncio.all_tasks())
    start = clock.now()
    results: dict[int, CallResult] = {}
    cancels = dict(cancel_after or {})
    requested: set[int] = set()

    async def one(index: int, question: str) -> None:
        current_call.set(index)
        current_recorder.set(recorder)
        if arrivals is not None:
            await clock.sleep(max(0.0, start + arrivals[index] - clock.now()))
        if gate is not None:
            await gate.acquire()
        try:
            call = pipeline.new_call(inputs[index])
            call.runtime = listened
            started = clock.now()
            task = asyncio.current_task()
            handle = None
            if index in cancels and task is not None:
                handle = loop.call_later(cancels[index], lambda: requested.add(index) if task.cancel() else None)
            value: Any = None
            error: BaseException | None = None
            try:
                value = await pipeline.run(call)
            except BaseException as caught:  # recorded, and a cancellation re-raised below
                error = caught
            finally:
                if handle is not None:
                    handle.cancel()
            record = call.record
            results[index] = CallResult(
                index,
                question,
                started,
                clock.now(),
                value,
                error,
                cancel_requested=index in requested,
                attempts=record.attempts,
                retries=record.retries,
                served_by=record.served_by,
                missing_inputs=tuple(missing.by_call.get(index, ())),
            )
            if isinstance(error, asyncio.CancelledError) and index not in requested:
                raise error
        finally:
            if gate is not None:
                gate.release()

    dspy_logger.addHandler(missing)
    try:
        tasks = [asyncio.create_task(one(i, q), name=f"harness-call-{i}") for i, q in enumerate(questions)]
        _, pending = await asyncio.wait(tasks, timeout=horizon) if tasks else (set(), set())
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending)
    finally:
        dspy_logger.removeHandler(missing)
        lag.stop()
    hung = {tasks.index(task) for task in pending}
    ended = clock.now()
    for _ in range(3):
        await asyncio.sleep(0)
    current = asyncio.current_task()
    orphans = sorted(
        repr(task) for task in asyncio.all_tasks() if task not in before and task is not current and not task.done()
    )
    calls_out: list[CallResult] = []
    for index, question in enumerate(questions):
        result = results.get(index)
        if index in hung or result is None:
            error = asyncio.CancelledError("still running at the horizon")
            base = result or CallResult(index, question, start, ended, error=error)
            late = tuple(missing.by_call.get(index, ()))
            result = dataclasses.replace(base, hung=True, ended=ended, error=error, missing_inputs=late)
        calls_out.append(result)
    return Run(calls_out, recorder.events, orphans, start, ended, horizon, longest_block=lag.longest, blocked_at=lag.at)
