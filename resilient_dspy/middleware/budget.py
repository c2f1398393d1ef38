"""Budget: cap the LM tokens and/or dollars the calls through a layer may spend, per period or for its lifetime.

Before a call runs, its cost is estimated — (characters of the inputs, instructions and demos) / 4 + the LM's
``max_tokens``, or your ``estimate_tokens`` — and checked against what is spent plus what the calls in flight
have reserved. If it does not fit, :class:`~resilient_dspy.BudgetExceededError` is raised and nothing runs.
Otherwise the estimate is reserved while the call runs, so concurrent calls cannot all pass the same check, and
when it ends the reservation is replaced by the usage DSPy measured: a failed call that got responses still spent
them; a call that reached no LM (or only DSPy's cache) spends nothing.

With ``per=`` spending counts in fixed windows of ``per`` seconds: a window opens at the first call admitted after
the previous one ended, and while calls are in flight at its end the next window follows on directly. A rejection's
``retry_after`` is the time until the window resets; a lifetime budget (``per=None``) never resets on its own, so
its ``retry_after`` is None. No background task is involved.
"""

from __future__ import annotations

import inspect
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field, field_validator, model_validator

from resilient_dspy.binding.estimate import DEFAULT_MAX_TOKENS, estimate_chars, lm_max_tokens, program_parts
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.core.health import LayerHealth, Status, key_name, worst
from resilient_dspy.core.options import FieldProblem, build_options
from resilient_dspy.core.pipeline import innermost_program
from resilient_dspy.errors import BudgetExceededError, ConfigurationError, RequestTooLargeError
from resilient_dspy.events import Event, Rejected
from resilient_dspy.middleware._shared.partitions import Hold, KeyFunction, PartitionOptions, Partitions

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.clock import Clock
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "Budget",
    "BudgetAlert",
    "BudgetOptions",
    "BudgetRejected",
    "BudgetSnapshot",
    "BudgetSpent",
    "BudgetUsage",
    "PriceFunction",
]

logger = logging.getLogger("resilient_dspy.budget")

"""Completion tokens the default estimate assumes when the LM sets no ``max_tokens`` (as the rate limiter's)."""

Unit = Literal["tokens", "dollars"]

PriceFunction = Callable[[Mapping[str, Mapping[str, Any]]], float]
"""Dollars for a DSPy usage dict ``{model: {"prompt_tokens": …, "completion_tokens": …, "total_tokens": …}}``."""

TokenEstimate = Callable[[Any], int | tuple[int, int]]
"""Tokens a call will use, before it runs: an int, or ``(prompt, completion)`` so a price can tell them apart."""


class BudgetOptions(PartitionOptions):
    """The caps, their period, and how a call's cost is estimated; see docs/patterns/budget.md."""

    tokens: int | None = Field(default=None, gt=0, description="LM tokens (prompt + completion) per period.")
    dollars: float | None = Field(default=None, gt=0, allow_inf_nan=False, description="Dollars per period.")
    per: float | None = Field(
        default=None, gt=0, allow_inf_nan=False, description="The period in seconds; None = the budget's lifetime."
    )
    price: PriceFunction | None = Field(default=None, description="Usage by model → dollars; needed by dollars=.")
    estimate_tokens: TokenEstimate | None = Field(
        default=None, description="A call's tokens before it runs; None = the default estimate."
    )
    alert_at: tuple[float, ...] = Field(default=(0.8,), description="Fractions of a cap that raise a BudgetAlert.")
    on_alert: Callable[[Any], object] | None = Field(default=None, description="Sync callback for each BudgetAlert.")
    name: str | None = Field(default=None, description="Label in events and describe().")

    @field_validator("alert_at", mode="before")
    @classmethod
    def _as_tuple(cls, value: Any) -> Any:
        return tuple(value) if isinstance(value, list) else value

    @field_validator("alert_at")
    @classmethod
    def _check_thresholds(cls, value: tuple[float, ...]) -> tuple[float, ...]:
        bad = [t for t in value if not (math.isfinite(t) and 0 < t <= 1)]
        if bad:
            raise FieldProblem("alert_at", f"every threshold must be a fraction in (0, 1] (got {bad})")
        return tuple(sorted(set(value)))

    @field_validator("on_alert")
    @classmethod
    def _check_on_alert(cls, value: Callable[[Any], object] | None) -> Callable[[Any], object] | None:
        if value is not None and (
            inspect.iscoroutinefunction(value) or inspect.iscoroutinefunction(type(value).__call__)
        ):
            raise FieldProblem(
                "on_alert", f"must be a sync callable: it runs inside the call (got the async {value!r})"
            )
        return value

    @model_validator(mode="after")
    def _check_caps(self) -> BudgetOptions:
        if self.tokens is None and self.dollars is None:
            raise FieldProblem("tokens", "a budget needs a cap: give tokens=, dollars= or both")
        if self.dollars is not None and self.price is None:
            raise FieldProblem(
                "price", "is required with dollars=: a callable from the usage by model to dollars (e.g. a PriceTable)"
            )
        if self.dollars is None and self.price is not None:
            raise FieldProblem("price", "has no effect without dollars= (to count cost without a cap, use CostTracker)")
        return self


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetRejected(Rejected):
    """The call did not fit ``unit``'s cap (``spent`` + ``reserved`` + ``estimate`` > ``limit``) and did not run."""

    key: Hashable
    unit: Unit
    limit: float
    spent: float
    reserved: float
    estimate: float
    retry_after: float | None

    def rejection_reason(self) -> str:
        return str(self.unit)


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetSpent(Event):
    """A call ended: the estimate reserved up front, and the actual usage charged instead (dollars None if uncapped)."""

    key: Hashable
    estimated_tokens: int
    tokens: int
    estimated_dollars: float | None
    dollars: float | None


@dataclass(frozen=True, slots=True, kw_only=True)
class BudgetAlert(Event):
    """Spending of ``unit`` reached ``threshold`` of its cap (once per threshold per window); given to ``on_alert``."""

    key: Hashable
    unit: Unit
    threshold: float
    spent: float
    limit: float
    resets_at: float | None


@dataclass(frozen=True, slots=True)
class BudgetUsage:
    """One cap's state: ``spent`` in the current window (or lifetime), ``reserved`` by calls in flight."""

    unit: Unit
    limit: float
    spent: float
    reserved: float
    remaining: float


@dataclass(frozen=True, slots=True)
class BudgetSnapshot:
    """The state of one key's budget (see :meth:`Budget.snapshot`); ``resets_at`` is on the pipeline clock."""

    key: Hashable
    tokens: BudgetUsage | None
    dollars: BudgetUsage | None
    in_flight: int
    resets_at: float | None
    resets_in: float | None


class _Meter:
    """One cap: what the window has spent, what calls in flight reserve, and how many alert thresholds fired."""

    __slots__ = ("alerted", "limit", "reserved", "spent", "unit")

    def __init__(self, unit: Unit, limit: float) -> None:
        self.unit: Unit = unit
        self.limit = limit
        self.spent: float = 0
        self.reserved: float = 0
        self.alerted = 0

    def fits(self, amount: float) -> bool:
        return self.spent + self.reserved + amount <= self.limit

    def forget(self) -> None:
        self.spent = 0
        self.alerted = 0

    def usage(self) -> BudgetUsage:
        remaining = max(0.0, self.limit - self.spent - self.reserved)
        return BudgetUsage(self.unit, self.limit, self.spent, self.reserved, remaining)


class _Account:
    """The budget of one key: its meters, its window, and the calls in flight. Synchronous, so it needs no lock."""

    __slots__ = ("dollars", "in_flight", "meters", "per", "start", "tokens")

    def __init__(self, options: BudgetOptions) -> None:
        self.tokens = _Meter("tokens", options.tokens) if options.tokens is not None else None
        self.dollars = _Meter("dollars", options.dollars) if options.dollars is not None else None
        self.meters = tuple(meter for meter in (self.tokens, self.dollars) if meter is not None)
        self.per = options.per
        self.start: float | None = None
        self.in_flight = 0

    def roll(self, now: float) -> None:
        """End the window if its time is up; with calls in flight the next one starts where it ended."""
        start, per = self.start, self.per
        if start is None or per is None or now < start + per:
            return
        for meter in self.meters:
            meter.forget()
        self.start = start + per * ((now - start) // per) if self.in_flight else None

    def open(self, now: float) -> None:
        if self.start is None and self.per is not None:
            self.start = now

    def resets_at(self) -> float | None:
        return None if self.start is None or self.per is None else self.start + self.per

    def reset(self) -> None:
        for meter in self.meters:
            meter.forget()
        self.start = None

    def hold(self, now: float) -> Hold:
        """Calls in flight or spending in the current window pin it: forgetting spend would let a key overspend, so
        a budget is never evicted under pressure (unchanged rule; see docs/patterns/budget.md)."""
        self.roll(now)
        if self.in_flight or any(meter.spent for meter in self.meters):
            return Hold.CALLS
        return Hold.NOTHING


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"estimate_tokens must return an int >= 0 or a (prompt, completion) pair (got {value!r})")
    return value


class Budget:
    """Refuse calls that would overspend a token and/or dollar cap; see the module docstring."""

    def __init__(
        self,
        tokens: int | None = None,
        dollars: float | None = None,
        *,
        per: float | None = None,
        price: PriceFunction | None = None,
        estimate_tokens: TokenEstimate | None = None,
        alert_at: tuple[float, ...] | list[float] = (0.8,),
        on_alert: Callable[[BudgetAlert], object] | None = None,
        key: KeyFunction | None = None,
        max_keys: int = 1024,
        idle_after: float = 600.0,
        name: str | None = None,
    ) -> None:
        self.options = build_options(
            BudgetOptions,
            "Budget",
            {
                "tokens": tokens,
                "dollars": dollars,
                "per": per,
                "price": price,
                "estimate_tokens": estimate_tokens,
                "alert_at": alert_at,
                "on_alert": on_alert,
                "key": key,
                "max_keys": max_keys,
                "idle_after": idle_after,
                "name": name,
            },
        )
        options = self.options
        self.name = options.name or "Budget"
        self._key_of = options.key
        self._single = _Account(options)
        self._partitions: Partitions[_Account] = Partitions(
            lambda _: _Account(options), max_keys=options.max_keys, idle_after=options.idle_after
        )
        self._price = options.price
        self._custom_estimate = options.estimate_tokens
        self._thresholds = options.alert_at
        self._on_alert = options.on_alert
        self._prompt_chars = 0
        self._pinned_max_tokens: int | None = None
        self._pinned_model: str | None = None
        self._clock: Clock | None = None
        self._reported_unpriced: set[str] = set()

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program's instructions, demos and pinned LMs once, for the default estimate and its price."""
        self._clock = pipeline.clock
        chars, lms = program_parts(innermost_program(pipeline.program))
        self._prompt_chars = max(self._prompt_chars, chars)
        if lms:
            pinned = [lm_max_tokens(lm) or DEFAULT_MAX_TOKENS for lm in lms]
            self._pinned_max_tokens = max(self._pinned_max_tokens or 0, *pinned)
            self._pinned_model = self._pinned_model or getattr(lms[0], "model", None)
        unpriced = [
            model for model in (getattr(lm, "model", None) for lm in [*lms, setting("lm")]) if self._unpriced(model)
        ]
        if unpriced:
            raise ConfigurationError(
                [
                    (
                        "Budget.price",
                        f"has no price for model {unpriced[0]!r}: a dollar cap would count $0 for it and never trip "
                        f"(add it, e.g. PriceTable({{{unpriced[0]!r}: (input_per_million, output_per_million)}}))",
                    )
                ]
            )

    def _unpriced(self, model: Any) -> bool:
        """True for a model a price with ``lookup`` (a :class:`~resilient_dspy.observe.PriceTable`) cannot price."""
        lookup = getattr(self._price, "lookup", None)
        return (
            isinstance(model, str) and self.options.dollars is not None and callable(lookup) and lookup(model) is None
        )

    def _warn_unpriced(self, usage: Mapping[str, Any]) -> None:
        """Say once per model, at ERROR, that the dollar cap cannot see a model's spending."""
        for model in usage:
            if model not in self._reported_unpriced and self._unpriced(model) and len(self._reported_unpriced) < 256:
                self._reported_unpriced.add(model)
                logger.error(
                    "%s: no price for model %r: its calls count $0 against the dollar cap; give the price a "
                    "price for it",
                    self.name,
                    model,
                )

    # --------------------------------------------------------------------------------------- estimates

    def estimate(self, call: Call) -> tuple[int, int]:
        """``(prompt, completion)`` tokens expected: ``estimate_tokens(call)`` (an int counts as completion), or
        (characters of the inputs + instructions and demos) / 4 and the LM's ``max_tokens``."""
        custom = self._custom_estimate
        if custom is not None:
            value = custom(call)
            if isinstance(value, tuple) and len(value) == 2:
                return _tokens(value[0]), _tokens(value[1])
            return 0, _tokens(value)
        chars = self._prompt_chars
        for value in call.inputs.values():
            chars += len(value) if isinstance(value, str) else estimate_chars(value)
        completion = self._pinned_max_tokens or lm_max_tokens(setting("lm")) or DEFAULT_MAX_TOKENS
        return chars // 4, completion

    def _price_of(self, usage: Mapping[str, Mapping[str, Any]]) -> float:
        assert self._price is not None
        value = self._price(usage)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{self.name}: price must return a finite number of dollars >= 0 (got {value!r})")
        return float(value)

    def _estimate_dollars(self, prompt: int, completion: int) -> float:
        model = self._pinned_model or getattr(setting("lm"), "model", None) or "unknown"
        usage = {model: {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}}
        return self._price_of(usage)

    # --------------------------------------------------------------------------------------- the call

    async def __call__(self, call: Call, next: Handler) -> Any:
        clock = call.clock
        self._clock = clock
        now = clock.now()
        if self._key_of is None:
            account, key = self._single, None
        else:
            key = self._key_of(call)
            account = self._partitions.get(key, now)
        account.roll(now)
        prompt, completion = self.estimate(call)
        tokens = prompt + completion
        dollars = self._estimate_dollars(prompt, completion) if account.dollars is not None else 0.0
        self._admit(call, account, key, tokens, dollars, now)
        account.open(now)
        if account.tokens is not None:
            account.tokens.reserved += tokens
        if account.dollars is not None:
            account.dollars.reserved += dollars
        account.in_flight += 1
        with usage_scope() as scope:
            try:
                result = await next(call)
            except BaseException:
                self._settle(call, account, key, tokens, dollars, scope)
                raise
            self._settle(call, account, key, tokens, dollars, scope)
            attach_usage(result, scope)
        return result

    def _admit(self, call: Call, account: _Account, key: Hashable, tokens: int, dollars: float, now: float) -> None:
        for meter, amount in ((account.tokens, tokens), (account.dollars, dollars)):
            if meter is not None and amount > meter.limit:
                where = "" if key is None else f"[{key!r}]"
                raise RequestTooLargeError(
                    f"{self.name}{where}.{meter.unit}",
                    f"a call estimated at {amount:g} {meter.unit} exceeds the whole budget of {meter.limit:g}, so it "
                    "can never run (lower the LM's max_tokens or pass estimate_tokens=)",
                )
        for meter, amount in ((account.tokens, tokens), (account.dollars, dollars)):
            if meter is None or meter.fits(amount):
                continue
            resets_at = account.resets_at()
            retry_after = None if resets_at is None else max(0.0, resets_at - now)
            if call.listening:
                call.emit(
                    BudgetRejected(
                        pipeline=call.runtime.name,
                        layer=self.name,
                        time=now,
                        key=key,
                        unit=meter.unit,
                        limit=meter.limit,
                        spent=meter.spent,
                        reserved=meter.reserved,
                        estimate=amount,
                        retry_after=retry_after,
                    )
                )
            where = "" if key is None else f"[{key!r}]"
            period = "" if self.options.per is None else f" per {self.options.per:g}s"
            raise BudgetExceededError(
                f"{self.name}{where}: the {meter.unit[:-1]} budget of {meter.limit:g}{period} cannot cover this call "
                f"({meter.spent:g} spent, {meter.reserved:g} reserved, ~{amount:g} needed)",
                retry_after=retry_after,
            )

    def _settle(
        self, call: Call, account: _Account, key: Hashable, tokens: int, dollars: float, scope: UsageScope
    ) -> None:
        """Swap the reservation for the measured usage; never raises (it runs while an error may be propagating)."""
        now = call.clock.now()
        account.roll(now)
        account.in_flight -= 1
        usage = scope.by_model()
        actual_tokens = scope.total_tokens(usage) if usage else 0
        actual_dollars = 0.0
        if account.dollars is not None and usage:
            try:
                self._warn_unpriced(usage)
                actual_dollars = self._price_of(usage)
            except Exception:
                logger.exception("%s: the price function failed; the call is charged its estimate", self.name)
                actual_dollars = dollars
        for meter, reserved, actual in (
            (account.tokens, tokens, actual_tokens),
            (account.dollars, dollars, actual_dollars),
        ):
            if meter is None:
                continue
            meter.reserved = meter.reserved - reserved if account.in_flight else 0
            if actual:
                account.open(now)
                meter.spent += actual
        if call.listening:
            call.emit(
                BudgetSpent(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=now,
                    key=key,
                    estimated_tokens=tokens,
                    tokens=actual_tokens,
                    estimated_dollars=dollars if account.dollars is not None else None,
                    dollars=actual_dollars if account.dollars is not None else None,
                )
            )
        if self._thresholds:
            self._check_alerts(call, account, key, now)

    def _check_alerts(self, call: Call, account: _Account, key: Hashable, now: float) -> None:
        thresholds = self._thresholds
        for meter in account.meters:
            while meter.alerted < len(thresholds) and meter.spent >= thresholds[meter.alerted] * meter.limit:
                threshold = thresholds[meter.alerted]
                meter.alerted += 1
                if self._on_alert is None and not call.listening:
                    continue
                alert = BudgetAlert(
                    pipeline=call.runtime.name,
                    layer=self.name,
                    time=now,
                    key=key,
                    unit=meter.unit,
                    threshold=threshold,
                    spent=meter.spent,
                    limit=meter.limit,
                    resets_at=account.resets_at(),
                )
                if call.listening:
                    call.emit(alert)
                if self._on_alert is not None:
                    try:
                        self._on_alert(alert)
                    except Exception:
                        logger.exception("%s: on_alert failed on %r", self.name, alert)

    # --------------------------------------------------------------------------------------- state

    def _now(self) -> float | None:
        if self._clock is None:
            return None
        try:
            return self._clock.now()
        except RuntimeError:  # the loop clock outside a running loop
            return None

    def _snapshot(self, key: Hashable, account: _Account | None) -> BudgetSnapshot:
        account = account or _Account(self.options)
        now = self._now()
        if now is not None:
            account.roll(now)
        resets_at = account.resets_at()
        resets_in = None if resets_at is None or now is None else max(0.0, resets_at - now)
        tokens = account.tokens.usage() if account.tokens is not None else None
        dollars = account.dollars.usage() if account.dollars is not None else None
        return BudgetSnapshot(key, tokens, dollars, account.in_flight, resets_at, resets_in)

    def snapshot(self, key: Hashable = None) -> BudgetSnapshot:
        """Spent, reserved, limit and remaining per cap, and when the window resets, for ``key`` (None if unkeyed)."""
        if self._key_of is None:
            return self._snapshot(None, self._single)
        return self._snapshot(key, self._partitions.peek(key))

    def snapshots(self) -> dict[Hashable, BudgetSnapshot]:
        """Every live key's snapshot (the single budget under None when unpartitioned)."""
        if self._key_of is None:
            return {None: self._snapshot(None, self._single)}
        return {key: self._snapshot(key, account) for key, account in self._partitions.items()}

    def health(self) -> LayerHealth:
        """Down when a cap is spent (calls are refused until it resets); degraded past the first alert threshold."""
        alert = min(self._thresholds, default=1.0)
        statuses: list[Status] = []
        details: dict[str, Any] = {}
        for key, snap in self.snapshots().items():
            for usage in (snap.tokens, snap.dollars):
                if usage is None:
                    continue
                used = (usage.spent + usage.reserved) / usage.limit
                statuses.append("down" if usage.remaining <= 0 else "degraded" if used >= alert else "ok")
                details.setdefault(key_name(key), {})[usage.unit] = {
                    "limit": usage.limit,
                    "spent": usage.spent,
                    "remaining": usage.remaining,
                    "resets_in": snap.resets_in,
                }
        return LayerHealth(self.name, worst(statuses), {"budgets": details})

    def reset(self, key: Hashable = None) -> None:
        """Forget what was spent (for ``key``, or every key when partitioned and ``key`` is None); calls in flight
        keep their reservations and are charged when they end."""
        if self._key_of is None:
            self._single.reset()
            return
        if key is None:
            for _, account in self._partitions.items():
                account.reset()
            return
        found = self._partitions.peek(key)
        if found is not None:
            found.reset()

    def describe(self) -> dict[str, Any]:
        options = self.options.model_dump(exclude={"price", "estimate_tokens", "on_alert", "key"})
        options["price"] = None if self._price is None else _callable_name(self._price)
        options["estimate_tokens"] = (
            "default" if self._custom_estimate is None else _callable_name(self._custom_estimate)
        )
        options["on_alert"] = None if self._on_alert is None else _callable_name(self._on_alert)
        options["partitioned"] = self._key_of is not None
        return {"layer": "Budget", "name": self.name, "options": options}


def _callable_name(function: Any) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__
