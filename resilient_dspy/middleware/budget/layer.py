"""Budget: cap the LM tokens and/or dollars the calls through a layer may spend, per period or for its lifetime.

Before a call runs, its cost is estimated — (characters of the inputs, instructions and demos) / 4 + the LM's
``max_tokens`` (:class:`~resilient_dspy.binding.estimate.ProgramEstimate`), or your ``estimate_tokens`` — and
checked against what is spent plus what the calls in flight have reserved. If it does not fit,
:class:`~resilient_dspy.BudgetExceededError` is raised and nothing runs. Otherwise the estimate is reserved while
the call runs, so concurrent calls cannot all pass the same check, and when it ends the reservation is replaced by
the usage DSPy measured: a failed call that got responses still spent them; a call that reached no LM (or only
DSPy's cache) spends nothing.

With ``per=`` spending counts in fixed windows of ``per`` seconds: a window opens at the first call admitted after
the previous one ended, and while calls are in flight at its end the next window follows on directly. A rejection's
``retry_after`` is the time until the window resets; a lifetime budget (``per=None``) never resets on its own, so
its ``retry_after`` is None. No background task is involved.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Hashable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from resilient_dspy.binding.estimate import ProgramEstimate
from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.usage import UsageScope, attach_usage, usage_scope
from resilient_dspy.core.emit import emit_event
from resilient_dspy.core.health import LayerHealth, Status, key_name, worst
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import innermost_program
from resilient_dspy.errors import BudgetExceededError, ConfigurationError, RequestTooLargeError
from resilient_dspy.events import Event
from resilient_dspy.middleware._shared.partitions import KeyFunction, Partitions
from resilient_dspy.middleware.budget.accounts import _BudgetAccount
from resilient_dspy.middleware.budget.events import BudgetAlert, BudgetRejected, BudgetSnapshot, BudgetSpent
from resilient_dspy.middleware.budget.options import BudgetOptions, PriceFunction, TokenEstimate

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.clock import Clock
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["Budget"]

logger = logging.getLogger("resilient_dspy.budget")


class Budget(Layer):
    """Refuse calls that would overspend a token and/or dollar cap; see the module docstring."""

    placement: ClassVar[str] = "budget"
    options_type: ClassVar[type[Options]] = BudgetOptions
    options: BudgetOptions

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
        self.options = options = options_from(BudgetOptions, "Budget", locals())
        self._key_of = options.key
        self._single = _BudgetAccount(options)
        self._partitions: Partitions[_BudgetAccount] = Partitions(
            lambda _: _BudgetAccount(options), max_keys=options.max_keys, idle_after=options.idle_after
        )
        self._price = options.price
        self._custom_estimate = options.estimate_tokens
        self._thresholds = options.alert_at
        self._on_alert = options.on_alert
        self._program = ProgramEstimate()
        self._clock: Clock | None = None
        self._reported_unpriced: set[str] = set()

    def on_build(self, pipeline: Pipeline) -> None:
        """Learn the program's instructions, demos and pinned LMs once, for the default estimate and its price."""
        self._clock = pipeline.clock
        lms = self._program.learn(innermost_program(pipeline.program))
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
        account.reserve(tokens, dollars, now)
        with usage_scope() as scope:
            try:
                result = await next(call)
            except BaseException:
                self._settle(call, account, key, tokens, dollars, scope)
                raise
            self._settle(call, account, key, tokens, dollars, scope)
            attach_usage(result, scope)
        return result

    def estimate(self, call: Call) -> tuple[int, int]:
        """``(prompt, completion)`` tokens expected: ``estimate_tokens(call)`` (an int counts as completion), or
        the default :class:`~resilient_dspy.binding.estimate.ProgramEstimate`."""
        custom = self._custom_estimate
        if custom is None:
            return self._program.tokens(call)
        value = custom(call)
        if isinstance(value, tuple) and len(value) == 2:
            return _tokens(value[0]), _tokens(value[1])
        return 0, _tokens(value)

    def _admit(
        self, call: Call, account: _BudgetAccount, key: Hashable, tokens: int, dollars: float, now: float
    ) -> None:
        for meter, amount in ((account.tokens, tokens), (account.dollars, dollars)):
            if meter is not None and amount > meter.limit:
                raise RequestTooLargeError(
                    f"{self.name}{_where(key)}.{meter.unit}",
                    f"a call estimated at {amount:g} {meter.unit} exceeds the whole budget of {meter.limit:g}, so it "
                    "can never run (lower the LM's max_tokens or pass estimate_tokens=)",
                )
        for meter, amount in ((account.tokens, tokens), (account.dollars, dollars)):
            if meter is None or meter.fits(amount):
                continue
            resets_at = account.resets_at()
            retry_after = None if resets_at is None else max(0.0, resets_at - now)
            self.emit(
                call,
                BudgetRejected,
                key=key,
                unit=meter.unit,
                limit=meter.limit,
                spent=meter.spent,
                reserved=meter.reserved,
                estimate=amount,
                retry_after=retry_after,
            )
            period = "" if self.options.per is None else f" per {self.options.per:g}s"
            raise BudgetExceededError(
                f"{self.name}{_where(key)}: the {meter.unit[:-1]} budget of {meter.limit:g}{period} cannot cover this "
                f"call ({meter.spent:g} spent, {meter.reserved:g} reserved, ~{amount:g} needed)",
                retry_after=retry_after,
            )

    def _settle(
        self, call: Call, account: _BudgetAccount, key: Hashable, tokens: int, dollars: float, scope: UsageScope
    ) -> None:
        """Swap the reservation for the measured usage; never raises (it runs while an error may be propagating)."""
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
        now = call.clock.now()
        account.charge(tokens, dollars, actual_tokens, actual_dollars, now)
        if call.listening:  # every call passes here: not even the fields are gathered for no one
            priced = account.dollars is not None
            self.emit(
                call,
                BudgetSpent,
                key=key,
                estimated_tokens=tokens,
                tokens=actual_tokens,
                estimated_dollars=dollars if priced else None,
                dollars=actual_dollars if priced else None,
            )
        if self._thresholds:
            self._check_alerts(call, account, key)

    def _check_alerts(self, call: Call, account: _BudgetAccount, key: Hashable) -> None:
        thresholds = self._thresholds
        for meter in account.meters:
            while meter.alerted < len(thresholds) and meter.spent >= thresholds[meter.alerted] * meter.limit:
                threshold = thresholds[meter.alerted]
                meter.alerted += 1
                fields = {
                    "key": key,
                    "unit": meter.unit,
                    "threshold": threshold,
                    "spent": meter.spent,
                    "limit": meter.limit,
                    "resets_at": account.resets_at(),
                }
                if self._on_alert is None:
                    self.emit(call, BudgetAlert, **fields)
                else:  # on_alert is one more listener of the alert, so it gets the very object the listeners get
                    runtime = call.runtime
                    listeners = (*runtime.listeners, self._hand_to_on_alert)
                    emit_event(dataclasses.replace(runtime, listeners=listeners), self.name, BudgetAlert, **fields)

    def _hand_to_on_alert(self, event: Event) -> None:
        """Give an alert to ``on_alert``; its failure is logged here, never raised into the call."""
        if self._on_alert is None:
            return
        try:
            self._on_alert(event)
        except Exception:
            logger.exception("%s: on_alert failed on %r", self.name, event)

    # --------------------------------------------------------------------------------------- prices

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

    def _price_of(self, usage: Mapping[str, Mapping[str, Any]]) -> float:
        assert self._price is not None
        value = self._price(usage)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{self.name}: price must return a finite number of dollars >= 0 (got {value!r})")
        return float(value)

    def _estimate_dollars(self, prompt: int, completion: int) -> float:
        usage = {
            self._program.model(): {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        }
        return self._price_of(usage)

    # --------------------------------------------------------------------------------------- state

    def _now(self) -> float | None:
        if self._clock is None:
            return None
        try:
            return self._clock.now()
        except RuntimeError:  # the loop clock outside a running loop
            return None

    def snapshot(self, key: Hashable = None) -> BudgetSnapshot:
        """Spent, reserved, limit and remaining per cap, and when the window resets, for ``key`` (None if unkeyed)."""
        if self._key_of is None:
            return self._single.snapshot(None, self._now())
        account = self._partitions.peek(key) or _BudgetAccount(self.options)
        return account.snapshot(key, self._now())

    def snapshots(self) -> dict[Hashable, BudgetSnapshot]:
        """Every live key's snapshot (the single budget under None when unpartitioned)."""
        now = self._now()
        if self._key_of is None:
            return {None: self._single.snapshot(None, now)}
        return {key: account.snapshot(key, now) for key, account in self._partitions.items()}

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
        """The base's ``describe()`` with each function by name (``estimate_tokens`` "default" when not given) and
        ``partitioned`` in place of the key function."""
        described = super().describe()
        options = self.options.model_dump(exclude={"price", "estimate_tokens", "on_alert", "key"})
        options["price"] = None if self._price is None else _callable_name(self._price)
        options["estimate_tokens"] = (
            "default" if self._custom_estimate is None else _callable_name(self._custom_estimate)
        )
        options["on_alert"] = None if self._on_alert is None else _callable_name(self._on_alert)
        options["partitioned"] = self._key_of is not None
        described["options"] = options
        return described


def _tokens(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"estimate_tokens must return an int >= 0 or a (prompt, completion) pair (got {value!r})")
    return value


def _where(key: Hashable) -> str:
    """A key as the refusal names it: ``[key]`` after the layer's name, nothing for the single budget."""
    return "" if key is None else f"[{key!r}]"


def _callable_name(function: Any) -> str:
    return getattr(function, "__qualname__", None) or type(function).__name__
