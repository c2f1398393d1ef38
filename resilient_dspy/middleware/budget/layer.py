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
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar, NoReturn

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
from resilient_dspy.middleware.budget.options import BudgetOptions, PriceFunction, TokenEstimate, Unit
from resilient_dspy.middleware.budget.pricing import Pricing
from resilient_dspy.middleware.budget.shared import SharedBudgets, call_shared
from resilient_dspy.store.protocol import FailMode, StateStore

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call, Handler
    from resilient_dspy.core.clock import Clock
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["Budget"]

logger = logging.getLogger("resilient_dspy.budget")


class Budget(Pricing, Layer):
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
        reservation_ttl: float = 600.0,
        store: StateStore | None = None,
        on_store_failure: FailMode = "local",
        name: str | None = None,
    ) -> None:
        self.options = options = options_from(BudgetOptions, "Budget", locals())
        self._shared = None if store is None else SharedBudgets(self, options, store, on_store_failure)
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
        if self._shared is not None:
            return await call_shared(self, self._shared, call, next)
        return await self.call_local(call, next)

    async def call_local(self, call: Call, next: Handler) -> Any:
        """A call on in-process accounts (the store's fallback too): reserve, run, charge."""
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
        dollars = self.estimate_dollars(prompt, completion) if account.dollars is not None else 0.0
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

    def check_size(self, key: Hashable, tokens: int, dollars: float) -> None:
        """Raise :class:`RequestTooLargeError` for an estimate above a whole cap: it could never run."""
        for unit, limit, amount in (
            ("tokens", self.options.tokens, tokens),
            ("dollars", self.options.dollars, dollars),
        ):
            if limit is not None and amount > limit:
                raise RequestTooLargeError(
                    f"{self.name}{_where(key)}.{unit}",
                    f"a call estimated at {amount:g} {unit} exceeds the whole budget of {limit:g}, so it "
                    "can never run (lower the LM's max_tokens or pass estimate_tokens=)",
                )

    def _admit(
        self, call: Call, account: _BudgetAccount, key: Hashable, tokens: int, dollars: float, now: float
    ) -> None:
        self.check_size(key, tokens, dollars)
        for meter, amount in ((account.tokens, tokens), (account.dollars, dollars)):
            if meter is None or meter.fits(amount):
                continue
            resets_at = account.resets_at()
            retry_after = None if resets_at is None else max(0.0, resets_at - now)
            self.refuse(call, key, meter.unit, meter.limit, meter.spent, meter.reserved, amount, retry_after)

    def refuse(
        self,
        call: Call,
        key: Hashable,
        unit: Unit,
        limit: float,
        spent: float,
        reserved: float,
        amount: float,
        retry_after: float | None,
    ) -> NoReturn:
        """Emit :class:`BudgetRejected` and raise :class:`BudgetExceededError` for a call ``unit`` cannot cover."""
        self.emit(
            call,
            BudgetRejected,
            key=key,
            unit=unit,
            limit=limit,
            spent=spent,
            reserved=reserved,
            estimate=amount,
            retry_after=retry_after,
        )
        period = "" if self.options.per is None else f" per {self.options.per:g}s"
        raise BudgetExceededError(
            f"{self.name}{_where(key)}: the {unit[:-1]} budget of {limit:g}{period} cannot cover this "
            f"call ({spent:g} spent, {reserved:g} reserved, ~{amount:g} needed)",
            retry_after=retry_after,
        )

    def _settle(
        self, call: Call, account: _BudgetAccount, key: Hashable, tokens: int, dollars: float, scope: UsageScope
    ) -> None:
        """Swap the reservation for the measured usage; never raises (it runs while an error may be propagating)."""
        actual_tokens, actual_dollars = self.measure(scope, dollars)
        now = call.clock.now()
        account.charge(tokens, dollars, actual_tokens, actual_dollars, now)
        self.spent(call, key, tokens, dollars, actual_tokens, actual_dollars)
        if self._thresholds:
            self._check_alerts(call, account, key)

    def spent(self, call: Call, key: Hashable, tokens: int, dollars: float, used: int, cost: float) -> None:
        """Emit :class:`BudgetSpent`: the estimate reserved and what the call used."""
        if call.listening:  # every call passes here: not even the fields are gathered for no one
            priced = self.options.dollars is not None
            self.emit(
                call,
                BudgetSpent,
                key=key,
                estimated_tokens=tokens,
                tokens=used,
                estimated_dollars=dollars if priced else None,
                dollars=cost if priced else None,
            )

    def _check_alerts(self, call: Call, account: _BudgetAccount, key: Hashable) -> None:
        thresholds = self._thresholds
        for meter in account.meters:
            while meter.alerted < len(thresholds) and meter.spent >= thresholds[meter.alerted] * meter.limit:
                threshold = thresholds[meter.alerted]
                meter.alerted += 1
                self.alert(call, key, meter.unit, threshold, meter.spent, meter.limit, account.resets_at())

    def alert(
        self, call: Call, key: Hashable, unit: Unit, threshold: float, spent: float, limit: float, at: float | None
    ) -> None:
        """Emit one :class:`BudgetAlert` (and hand it to ``on_alert``)."""
        fields = {"key": key, "unit": unit, "threshold": threshold, "spent": spent, "limit": limit, "resets_at": at}
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

    # --------------------------------------------------------------------------------------- state

    def _now(self) -> float | None:
        if self._clock is None:
            return None
        try:
            return self._clock.now()
        except RuntimeError:  # the loop clock outside a running loop
            return None

    def snapshot(self, key: Hashable = None) -> BudgetSnapshot:
        """Spent, reserved, limit and remaining per cap, and when the window resets, for ``key`` (None if unkeyed).
        On a store: as the last step of this process found it."""
        if self._shared is not None and key in self._shared.mirror:
            return self._shared.mirror[key]
        if self._key_of is None:
            return self._single.snapshot(None, self._now())
        account = self._partitions.peek(key) or _BudgetAccount(self.options)
        return account.snapshot(key, self._now())

    def snapshots(self) -> dict[Hashable, BudgetSnapshot]:
        """Every live key's snapshot (the single budget under None when unpartitioned); on a store, the mirrored."""
        now = self._now()
        if self._shared is not None and self._shared.mirror:
            return dict(self._shared.mirror)
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
        health: dict[str, Any] = {"budgets": details}
        link = None if self._shared is None else self._shared.link
        if link is not None:
            health.update(link.health_details())
            if link.degraded:
                statuses.append("down" if link.mode == "reject" else "degraded")
        return LayerHealth(self.name, worst(statuses), health)

    def reset(self, key: Hashable = None) -> None:
        """Forget what was spent (for ``key``, or every key when partitioned and ``key`` is None); calls in flight
        keep their reservations and are charged when they end. On a store use :meth:`areset`."""
        if self._shared is not None:
            raise RuntimeError(f"{self.name} keeps its budget on a store: use await areset()")
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

    async def areset(self, key: Hashable = None) -> None:
        """:meth:`reset` that also works on a store (there, for ``key`` only, in every process)."""
        if self._shared is None:
            self.reset(key)
        else:
            await self._shared.reset(key)

    def describe(self) -> dict[str, Any]:
        """The base's ``describe()`` with each function by name (``estimate_tokens`` "default" when not given) and
        ``partitioned`` in place of the key function."""
        described = super().describe()
        options = self.dump_options(frozenset({"price", "estimate_tokens", "on_alert", "key"}))
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
