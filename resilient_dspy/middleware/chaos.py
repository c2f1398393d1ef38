"""Chaos: inject faults, latency, bad answers or side effects into the calls below, to test the layers above.

Place it just above the program (below Cache), so it stands in for a failing dependency. Each call first takes
the next entry of an exact ``script`` (fault kinds shared with the test kit: :class:`~resilient_dspy.faults.Fault`),
then, when the script is spent, applies the one strategy given (``fault``, ``latency``, ``outcome`` or ``effect``) with
probability ``rate``, drawn from the pipeline's random source (or the Chaos's own ``seed``). A disabled Chaos is
transparent and consumes nothing. Latency sleeps on the pipeline clock and is cancellable; a ``hang`` waits until
cancelled; cancellation is never caught. A fault or answer injected in the program's place counts as an attempt
(``call.record.attempts``), so the layers above judge it as they would the provider's.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import random
import warnings
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import dspy
from pydantic import Field, ValidationInfo, field_validator, model_validator

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.health import LayerHealth, Status
from resilient_dspy.core.layer import Layer, roles
from resilient_dspy.core.options import FieldProblem, Options, options_from
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event
from resilient_dspy.faults import Fault, FaultStep, ScriptEntry, fault_error, parse_steps

__all__ = ["Chaos", "ChaosInjected", "ChaosOptions", "ChaosSnapshot", "OutcomeKind"]

OutcomeKind = Literal["empty", "malformed", "wrong_fields"]
OUTCOME_KINDS: tuple[str, ...] = ("empty", "malformed", "wrong_fields")
Enabled = bool | Callable[[Call], bool]


class ChaosOptions(Options):
    """What a Chaos injects, how often, and from which random source; see docs/patterns/chaos.md."""

    fault: Any = Field(
        default=None, description="A Fault kind, an Exception instance or type, or a factory (call) -> Exception."
    )
    latency: tuple[float, float] | None = Field(default=None, description="Seconds, or a (low, high) range.")
    outcome: Any = Field(
        default=None, description="'empty', 'malformed', 'wrong_fields', a factory (call) -> value, or a value."
    )
    effect: Callable[[Call], Any] | None = Field(default=None, description="A callable of the call, sync or async.")
    rate: float = Field(default=1.0, ge=0, le=1, allow_inf_nan=False, description="Injection probability per call.")
    script: tuple[FaultStep, ...] = Field(default=(), description="Exact steps, one per call, before the strategy.")
    retry_after: tuple[float, float] | None = Field(default=None, description="Retry-After of named rate limits.")
    enabled: Enabled = Field(default=True, description="On/off, or a predicate of the call.")
    seed: int | None = Field(default=None, description="Own random source; None = the pipeline's rng.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("fault", mode="before")
    @classmethod
    def _fault(cls, value: Any) -> Any:
        if value is None or isinstance(value, Exception):
            return value
        if isinstance(value, Fault | str):
            known = [kind.value for kind in Fault]
            if value not in known:
                raise FieldProblem("fault", f"unknown fault {value!r}; known: {', '.join(known)}")
            if value == Fault.OK:
                raise FieldProblem("fault", "'ok' injects nothing; give a fault kind that fails")
            return Fault(value)
        if isinstance(value, type):
            if not issubclass(value, Exception):
                raise FieldProblem(
                    "fault", f"must be an Exception, not {value.__name__}: injected cancellation breaks asyncio"
                )
            try:
                value()
            except Exception:
                raise FieldProblem(
                    "fault", f"{value.__name__}() needs arguments; pass an instance or a factory (call) -> error"
                ) from None
            return value
        if isinstance(value, BaseException):
            raise FieldProblem(
                "fault", f"must be an Exception, not {type(value).__name__}: injected cancellation breaks asyncio"
            )
        if callable(value):
            return value
        raise FieldProblem(
            "fault", f"must be a fault kind, an Exception (instance or type) or a factory (got {value!r})"
        )

    @field_validator("latency", "retry_after", mode="before")
    @classmethod
    def _spans(cls, value: Any, info: ValidationInfo) -> tuple[float, float] | None:
        return _span(value, info.field_name or "latency")

    @field_validator("outcome", mode="before")
    @classmethod
    def _outcome(cls, value: Any) -> Any:
        if isinstance(value, str) and value not in OUTCOME_KINDS:
            raise FieldProblem(
                "outcome",
                f"unknown outcome {value!r}; known: {', '.join(OUTCOME_KINDS)} (return a string with a factory)",
            )
        return value

    @field_validator("script", mode="before")
    @classmethod
    def _script(cls, value: Any) -> tuple[FaultStep, ...]:
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise FieldProblem("script", f"must be a sequence of fault kinds, None or FaultSteps (got {value!r})")
        try:
            return tuple(parse_steps(value, "script"))
        except ConfigurationError as error:
            rules = [rule if field == "script" else f"{field}: {rule}" for field, rule in error.problems]
            raise FieldProblem("script", "; ".join(rules)) from None

    @field_validator("enabled", mode="before")
    @classmethod
    def _enabled(cls, value: Any) -> Any:
        if not isinstance(value, bool) and not callable(value):
            raise FieldProblem("enabled", f"must be a bool or a predicate (call) -> bool (got {value!r})")
        return value

    @model_validator(mode="after")
    def _one_strategy(self) -> ChaosOptions:
        given = [name for name in ("fault", "latency", "outcome", "effect") if getattr(self, name) is not None]
        if len(given) > 1:
            raise FieldProblem(
                given[1], f"one strategy per Chaos ({given[0]}= is given too); stack Chaos layers to combine them"
            )
        if not given and not self.script:
            raise FieldProblem("fault", "give a strategy (fault=, latency=, outcome= or effect=) or a script=")
        if not given and self.rate != 1.0:
            raise FieldProblem("rate", "applies to a strategy (fault=, latency=, outcome=, effect=); a script is exact")
        rate_limited = self.fault is Fault.RATE_LIMIT or any(step.fault is Fault.RATE_LIMIT for step in self.script)
        if self.retry_after is not None and not rate_limited:
            raise FieldProblem("retry_after", "applies only to the rate_limit fault (in fault= or script=)")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class ChaosInjected(Event):
    """Chaos injected something: ``kind`` is fault, latency, outcome or effect; ``detail`` says what."""

    kind: str
    detail: str
    fault: Fault | None = None
    scripted: bool = False


@dataclass(frozen=True, slots=True)
class ChaosSnapshot:
    """A Chaos now: its switch (``"predicate"`` when decided per call), the scripted steps left, the injections made."""

    enabled: bool | Literal["predicate"]
    pending: tuple[FaultStep, ...]
    injected: int


class Chaos(Layer):
    """Inject a fault, latency, a replaced outcome or a side effect into calls below this layer."""

    options_type: ClassVar[type[Options]] = ChaosOptions
    options: ChaosOptions

    def __init__(
        self,
        *,
        fault: Fault | str | Exception | type[Exception] | Callable[[Call], Exception] | None = None,
        latency: float | tuple[float, float] | None = None,
        outcome: OutcomeKind | Callable[[Call], Any] | Any = None,
        effect: Callable[[Call], Any] | None = None,
        rate: float = 1.0,
        script: list[ScriptEntry] | tuple[ScriptEntry, ...] = (),
        retry_after: float | tuple[float, float] | None = None,
        enabled: Enabled = True,
        seed: int | None = None,
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(ChaosOptions, "Chaos", locals())
        self._enabled: Enabled = options.enabled
        self._script: deque[FaultStep] = deque(options.script)
        self._rng = random.Random(seed) if seed is not None else None
        self._signature: Any = None
        self._named_step = FaultStep(options.fault) if isinstance(options.fault, Fault) else None
        self.injected = 0
        """Injections so far (also in :meth:`snapshot`)."""

    @property
    def enabled(self) -> Enabled:
        """On/off switch, or a predicate of the call; settable at run time (``chaos.enabled = False``)."""
        return self._enabled

    @enabled.setter
    def enabled(self, value: Enabled) -> None:
        if not isinstance(value, bool) and not callable(value):
            rule = f"must be a bool or a predicate (call) -> bool (got {value!r})"
            raise ConfigurationError([("Chaos.enabled", rule)])
        self._enabled = value

    @property
    def pending(self) -> tuple[FaultStep, ...]:
        """The scripted steps not yet consumed, in order (also in :meth:`snapshot`)."""
        return tuple(self._script)

    def push(self, *entries: ScriptEntry) -> None:
        """Append steps (fault kinds, None, FaultSteps) to the script; all are validated before any is added."""
        self._script.extend(parse_steps(entries, "Chaos.push"))

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program's signature (for injected parse errors); warn when a cache sits below this layer."""
        program = pipeline.program
        if isinstance(program, dspy.Module):
            predictors = program.predictors()
            if predictors:
                self._signature = predictors[-1].signature
        _, inner = pipeline.layers_around(self)
        if "cache" in roles(inner):
            warnings.warn(
                "Chaos is placed above a Cache: it fails calls the cache would have served, and a cached answer "
                "hides its faults. Place Chaos below the Cache, just above the program.",
                ResilienceWarning,
                stacklevel=3,
            )

    def _active(self, call: Call) -> bool:
        enabled = self._enabled
        return enabled if isinstance(enabled, bool) else bool(enabled(call))

    def _emit(self, call: Call, kind: str, detail: str, fault: Fault | None = None, scripted: bool = False) -> None:
        self.injected += 1
        self.emit(call, ChaosInjected, kind=kind, detail=detail, fault=fault, scripted=scripted)

    def _retry_after(self, rng: random.Random) -> float | None:
        span = self.options.retry_after
        if span is None:
            return None
        return span[0] if span[0] == span[1] else round(rng.uniform(*span), 3)

    async def _named(self, call: Call, step: FaultStep, rng: random.Random, scripted: bool) -> None:
        """Inject a named fault: raise its DSPy error, or hang until cancelled."""
        if step.fault is Fault.HANG:
            self._emit(call, "fault", "hang", Fault.HANG, scripted)
            call.record.attempts += 1
            await _forever()
        retry_after = step.retry_after
        if retry_after is None and step.fault is Fault.RATE_LIMIT:
            retry_after = self._retry_after(rng)
        error = fault_error(step.fault, retry_after=retry_after, status=step.status, signature=self._signature)
        if error is None:
            return
        self._emit(call, "fault", f"{step.fault.value}: {_describe_error(error)}", step.fault, scripted)
        call.record.attempts += 1
        raise error

    async def _scripted(self, call: Call, next: Handler, step: FaultStep, rng: random.Random) -> Any:
        if step.latency:
            self._emit(call, "latency", f"{step.latency:g}s", None, True)
            await call.clock.sleep(step.latency)
        await self._named(call, step, rng, scripted=True)
        return await next(call)

    def _error(self, call: Call) -> Exception:
        fault = self.options.fault
        if isinstance(fault, Exception):
            return fault.with_traceback(None)
        error = fault() if isinstance(fault, type) else fault(call)
        if not isinstance(error, Exception):
            raise TypeError(f"Chaos fault factory {fault!r} returned {error!r}, not an Exception")
        return error

    async def __call__(self, call: Call, next: Handler) -> Any:
        if not self._active(call):
            return await next(call)
        rng = self._rng or call.rng
        if self._script:
            return await self._scripted(call, next, self._script.popleft(), rng)
        options = self.options
        if options.rate <= 0.0 or (options.rate < 1.0 and rng.random() >= options.rate) or not self._has_strategy():
            return await next(call)

        fault = options.fault
        if self._named_step is not None:
            await self._named(call, self._named_step, rng, scripted=False)
            return await next(call)
        if fault is not None:
            error = self._error(call)
            self._emit(call, "fault", _describe_error(error))
            call.record.attempts += 1
            raise error
        if options.latency is not None:
            low, high = options.latency
            delay = low if low == high else rng.uniform(low, high)
            self._emit(call, "latency", f"{delay:g}s")
            await call.clock.sleep(delay)
            return await next(call)
        if options.effect is not None:
            self._emit(call, "effect", getattr(options.effect, "__name__", repr(options.effect)))
            done = options.effect(call)
            if inspect.isawaitable(done):
                await done
            return await next(call)
        outcome = options.outcome
        if isinstance(outcome, str):
            corrupted = _corrupt(outcome, await next(call))
            self._emit(call, "outcome", outcome)
            return corrupted
        call.record.attempts += 1  # the injected answer stands in for the program's
        if callable(outcome):
            self._emit(call, "outcome", f"factory {getattr(outcome, '__name__', repr(outcome))}")
            value = outcome(call)
            return await value if inspect.isawaitable(value) else value
        self._emit(call, "outcome", f"value {type(outcome).__name__}")
        return outcome

    def _has_strategy(self) -> bool:
        options = self.options
        return any(v is not None for v in (options.fault, options.latency, options.outcome, options.effect))

    def snapshot(self) -> ChaosSnapshot:
        """Its switch, the scripted steps left and the injections so far."""
        enabled = self._enabled
        return ChaosSnapshot(enabled if isinstance(enabled, bool) else "predicate", self.pending, self.injected)

    def health(self) -> LayerHealth:
        """Degraded while it can inject (switched on, with a strategy at a rate above 0 or script steps left): the
        calls below fail on purpose. Ok once switched off or spent."""
        snapshot, options = self.snapshot(), self.options
        armed = snapshot.pending or (self._has_strategy() and options.rate > 0)
        status: Status = "degraded" if snapshot.enabled is not False and armed else "ok"
        details = {"enabled": snapshot.enabled, "pending": len(snapshot.pending), "injected": snapshot.injected}
        return LayerHealth(self.name, status, details)

    def describe_state(self) -> dict[str, Any]:
        enabled = self._enabled
        return {"enabled": enabled if isinstance(enabled, bool) else "predicate", "pending": len(self._script)}


def _span(value: Any, field: str) -> tuple[float, float] | None:
    """``x`` or ``(low, high)`` seconds as a validated ``(low, high)``."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, int | float) and not isinstance(value, bool) else value
    if (
        not isinstance(pair, tuple | list)
        or len(pair) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) for v in pair)
        or not 0 <= pair[0] <= pair[1]
    ):
        raise FieldProblem(field, f"must be seconds >= 0, or (low, high) with 0 <= low <= high (got {value!r})")
    return float(pair[0]), float(pair[1])


def _empty(value: Any) -> Any:
    if isinstance(value, str | list | dict | tuple):
        return type(value)()
    return None


def _corrupt(kind: str, result: Any) -> Any:
    """The result as a badly-behaved model would have answered: emptied, malformed, or under the wrong names."""
    if isinstance(result, dspy.Prediction | dict):
        fields = dict(result.items())
        if kind == "empty":
            changed = {name: _empty(value) for name, value in fields.items()}
        elif kind == "malformed":
            changed = {name: f"<malformed {name}>" for name in fields}
        else:
            changed = {f"unexpected_{name}": value for name, value in fields.items()}
        if isinstance(result, dict):
            return changed
        corrupted = dspy.Prediction(**changed)
        corrupted.set_lm_usage(result.get_lm_usage())
        return corrupted
    if kind == "empty":
        return _empty(result)
    if kind == "malformed":
        return "<malformed>"
    return dspy.Prediction(unexpected=result)


async def _forever() -> None:
    """Never return; only cancellation (a Timeout above, or the caller) ends it."""
    await asyncio.Event().wait()


def _describe_error(error: BaseException) -> str:
    detail = type(error).__name__
    status, retry_after = getattr(error, "status", None), getattr(error, "retry_after", None)
    extras = [f"status={status}"] if status is not None else []
    extras += [f"retry_after={retry_after:g}"] if isinstance(retry_after, int | float) else []
    return f"{detail}({', '.join(extras)})" if extras else detail
