"""Cost accounting: the LM tokens each call used, priced per model, totalled per pipeline, per key and per model.

:class:`CostTracker` is a middleware (place it outermost): it measures the tokens DSPy's usage tracker records
during the call — failed attempts included, since they were billed too — prices them with a :class:`PriceTable`,
and adds them up. Built into a pipeline it also listens for cache hits, and counts the tokens (and, when the
event carries it, the cost) the cache saved. A model with no price is counted in ``unpriced_tokens`` and logged
once; it never fails a call.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Callable, Hashable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache.events import CacheCoalesced, CacheHit
from resilient_dspy.observe.common import TokenUsage, UsageWindow, outcome_of, safely, subscribe_once

__all__ = [
    "DEFAULT_PRICES",
    "PRICES_AS_OF",
    "CallCost",
    "CostTotals",
    "CostTracker",
    "ModelPrice",
    "PriceTable",
]

logger = logging.getLogger("resilient_dspy.cost")


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """US dollars per one million input (prompt) and output (completion) tokens."""

    input: float
    output: float

    def cost(self, usage: TokenUsage) -> float:
        return (usage.input * self.input + usage.output * self.output) / 1_000_000


PRICES_AS_OF = "2026-11-23"
DEFAULT_PRICES: Mapping[str, ModelPrice] = {
    "gpt-4o-mini": ModelPrice(0.15, 0.60),
    "gpt-4o": ModelPrice(2.50, 10.00),
    "gpt-4.1": ModelPrice(2.00, 8.00),
    "gpt-4.1-mini": ModelPrice(0.40, 1.60),
    "gpt-4.1-nano": ModelPrice(0.10, 0.40),
    "gpt-5": ModelPrice(1.25, 10.00),
    "gpt-5-mini": ModelPrice(0.25, 2.00),
    "gpt-5-nano": ModelPrice(0.05, 0.40),
    "o4-mini": ModelPrice(1.10, 4.40),
    "claude-haiku-4-5": ModelPrice(1.00, 5.00),
    "claude-sonnet-4-5": ModelPrice(3.00, 15.00),
    "gemini-2.5-flash": ModelPrice(0.30, 2.50),
    "gemini-2.5-pro": ModelPrice(1.25, 10.00),
}
"""An example table: standard-tier list prices (no batch, cache-read or long-context tiers), copied on
:data:`PRICES_AS_OF` from the model map bundled with litellm 1.106.2. Prices change: pass your own."""

_DATE_SUFFIX = re.compile(r"(?:-\d{4}-\d{2}-\d{2}|[-@]\d{8})$")


def _candidates(model: str) -> Iterator[str]:
    """``openai/gpt-4o-mini-2024-07-18`` → itself, ``gpt-4o-mini-2024-07-18``, then each without the date."""
    names = [model]
    while "/" in names[-1]:
        names.append(names[-1].split("/", 1)[1])
    yield from names
    for name in names:
        undated = _DATE_SUFFIX.sub("", name)
        if undated != name:
            yield undated


def _litellm_price(cost_map: Mapping[str, Any], name: str) -> ModelPrice | None:
    entry = cost_map.get(name)
    if not isinstance(entry, Mapping):
        return None
    prompt, completion = entry.get("input_cost_per_token"), entry.get("output_cost_per_token")
    if not isinstance(prompt, int | float) or not isinstance(completion, int | float):
        return None
    return ModelPrice(float(prompt) * 1_000_000, float(completion) * 1_000_000)


class PriceTable:
    """Prices by model name; a name is looked up as given, without its ``provider/`` prefix(es), then undated.

    Order: ``prices`` you give, then litellm's ``model_cost`` map, then :data:`DEFAULT_PRICES` (``defaults=False``
    drops them). ``litellm="if_loaded"`` (default) reads litellm's map only when litellm is already imported —
    importing it takes seconds, too long for the middle of a call; ``True`` imports it now (set
    ``LITELLM_LOCAL_MODEL_COST_MAP=True`` to keep it offline); ``False`` never reads it.
    Calling the table on a DSPy usage dict (``{model: {"prompt_tokens": …}}``) returns dollars, so it can be a
    :class:`~resilient_dspy.middleware.cache.Cache`'s ``price=``.
    """

    def __init__(
        self,
        prices: Mapping[str, ModelPrice | tuple[float, float]] | None = None,
        *,
        defaults: bool = True,
        litellm: bool | Literal["if_loaded"] = "if_loaded",
    ) -> None:
        self.prices: dict[str, ModelPrice] = {
            name: price if isinstance(price, ModelPrice) else ModelPrice(*price)
            for name, price in (prices or {}).items()
        }
        for name, price in self.prices.items():
            if not (price.input >= 0 and price.output >= 0):
                raise ValueError(f"price of {name!r} must be >= 0 per million tokens (got {price})")
        self.defaults = defaults
        self.litellm = litellm
        if litellm is True:
            import litellm as _litellm  # noqa: F401  (imported now so lookups never import it mid-call)
        self._found: dict[str, ModelPrice | None] = {}
        self._warned: set[str] = set()

    def with_prices(self, prices: Mapping[str, ModelPrice | tuple[float, float]]) -> PriceTable:
        """A new table with ``prices`` added to (or overriding) this one's."""
        return PriceTable({**self.prices, **prices}, defaults=self.defaults, litellm=self.litellm)

    def _cost_map(self) -> Mapping[str, Any] | None:
        if self.litellm is False:
            return None
        module = sys.modules.get("litellm")
        cost_map = getattr(module, "model_cost", None)
        return cost_map if isinstance(cost_map, Mapping) else None

    def lookup(self, model: str) -> ModelPrice | None:
        """The price of ``model``, or None when no source knows it."""
        if model in self._found:
            return self._found[model]
        names = list(_candidates(model))
        price = next((self.prices[name] for name in names if name in self.prices), None)
        if price is None:
            cost_map = self._cost_map()
            if cost_map is not None:
                price = next((p for name in names if (p := _litellm_price(cost_map, name)) is not None), None)
        if price is None and self.defaults:
            price = next((DEFAULT_PRICES[name] for name in names if name in DEFAULT_PRICES), None)
        if price is not None or len(self._found) < 4096:
            self._found[model] = price
        return price

    def cost_of(self, model: str, tokens: TokenUsage) -> float | None:
        """Dollars for ``tokens`` of ``model``; None (logged once per model) when it has no price."""
        price = self.lookup(model)
        if price is not None:
            return price.cost(tokens)
        if model not in self._warned and len(self._warned) < 4096:
            self._warned.add(model)
            logger.warning("no price for model %r: its tokens are counted but not priced", model)
        return None

    def price_usage(self, usage: Mapping[str, TokenUsage]) -> tuple[float, tuple[str, ...]]:
        """Dollars for ``usage`` by model, and the models that had tokens but no price."""
        cost = 0.0
        unpriced: list[str] = []
        for model, tokens in usage.items():
            dollars = self.cost_of(model, tokens)
            if dollars is not None:
                cost += dollars
            elif tokens.total:
                unpriced.append(model)
        return cost, tuple(unpriced)

    def __call__(self, usage: Mapping[str, Mapping[str, Any]]) -> float:
        """Dollars for a DSPy usage dict by model; unknown models count 0."""
        return self.price_usage(_token_usage(usage))[0]

    def __repr__(self) -> str:
        return f"PriceTable({len(self.prices)} prices, defaults={self.defaults}, litellm={self.litellm!r})"


def _token_usage(usage: Mapping[str, Any]) -> dict[str, TokenUsage]:
    result = {}
    for model, entry in usage.items():
        if isinstance(entry, TokenUsage):
            result[model] = entry
        elif isinstance(entry, Mapping):
            prompt, completion = entry.get("prompt_tokens") or 0, entry.get("completion_tokens") or 0
            result[model] = TokenUsage(int(prompt), int(completion))
    return result


@dataclass(frozen=True, slots=True)
class CallCost:
    """What one call cost: tokens by model, dollars for the priced ones, and which models had no price."""

    pipeline: str
    key: Hashable
    outcome: str
    usage: dict[str, TokenUsage]
    cost: float
    unpriced: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class CostTotals:
    """Sums over calls: tokens, dollars (priced models only), unpriced tokens, and what the cache saved."""

    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost: float = 0.0
    unpriced_tokens: int = 0
    saved_tokens: int = 0
    saved_cost: float = 0.0

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class _RunningTotals:
    """The sums behind one :class:`CostTotals` (the whole tracker, a pipeline, a key or a model), kept mutable."""

    __slots__ = ("calls", "cost", "input_tokens", "output_tokens", "saved_cost", "saved_tokens", "unpriced_tokens")

    def __init__(self) -> None:
        self.calls = self.input_tokens = self.output_tokens = self.unpriced_tokens = self.saved_tokens = 0
        self.cost = self.saved_cost = 0.0

    def snapshot(self) -> CostTotals:
        return CostTotals(
            self.calls,
            self.input_tokens,
            self.output_tokens,
            self.cost,
            self.unpriced_tokens,
            self.saved_tokens,
            self.saved_cost,
        )


CostKeyFunction = Callable[[Call], Hashable]
"""Which key a call's cost is totalled under (``by_key()``); not a partition key: nothing is kept apart by it."""


class CostTracker:
    """Middleware that prices each call's LM usage and keeps totals (see the module docstring).

    ``prices`` is a :class:`PriceTable` or a mapping of model → :class:`ModelPrice` / ``(input, output)``.
    ``key`` (a function of the call, like the guards' ``key=``) adds totals per key; ``on_call`` receives each
    call's :class:`CallCost` (its failure is logged, never raised).
    """

    def __init__(
        self,
        prices: PriceTable | Mapping[str, ModelPrice | tuple[float, float]] | None = None,
        *,
        key: CostKeyFunction | None = None,
        on_call: Callable[[CallCost], object] | None = None,
        name: str = "CostTracker",
    ) -> None:
        self.prices = prices if isinstance(prices, PriceTable) else PriceTable(prices)
        self.key = key
        self.on_call = on_call
        self.name = name
        self._total = _RunningTotals()
        self._pipelines: dict[str, _RunningTotals] = {}
        self._keys: dict[Hashable, _RunningTotals] = {}
        self._models: dict[str, _RunningTotals] = {}
        self._current: ContextVar[tuple[str, Hashable] | None] = ContextVar(f"{name}.current", default=None)

    def on_build(self, pipeline: Pipeline) -> None:
        subscribe_once(pipeline, self.on_event)

    async def __call__(self, call: Call, next: Handler) -> Any:
        key = self._key_of(call)
        token = self._current.set((call.runtime.name, key))
        try:
            with UsageWindow() as window:
                try:
                    result = await next(call)
                except BaseException as error:
                    safely(self.name, self._record, call, key, window, error)
                    raise
                window.hand_back(result)
                safely(self.name, self._record, call, key, window, None)
                return result
        finally:
            self._current.reset(token)

    def _key_of(self, call: Call) -> Hashable:
        if self.key is None:
            return None
        try:
            return self.key(call)
        except Exception:
            logger.exception("%s: the key function failed; the call is counted without a key", self.name)
            return None

    def _accounts(self, pipeline: str, key: Hashable) -> list[_RunningTotals]:
        accounts = [
            self._total,
            self._pipelines.get(pipeline) or self._pipelines.setdefault(pipeline, _RunningTotals()),
        ]
        if self.key is not None and key is not None:
            accounts.append(self._keys.get(key) or self._keys.setdefault(key, _RunningTotals()))
        return accounts

    def _record(self, call: Call, key: Hashable, window: UsageWindow, error: BaseException | None) -> None:
        usage = window.usage()
        cost = 0.0
        unpriced: list[str] = []
        for model, tokens in usage.items():
            dollars = self.prices.cost_of(model, tokens)
            account = self._models.get(model) or self._models.setdefault(model, _RunningTotals())
            account.calls += 1
            account.input_tokens += tokens.input
            account.output_tokens += tokens.output
            if dollars is None:
                account.unpriced_tokens += tokens.total
                unpriced.append(model)
            else:
                account.cost += dollars
                cost += dollars
        pipeline = call.runtime.name
        for account in self._accounts(pipeline, key):
            account.calls += 1
            account.input_tokens += sum(u.input for u in usage.values())
            account.output_tokens += sum(u.output for u in usage.values())
            account.cost += cost
            account.unpriced_tokens += sum(usage[model].total for model in unpriced)
        if self.on_call is not None:
            outcome = outcome_of(error, call.record.served_by, call.record.attempts)
            self.on_call(CallCost(pipeline, key, outcome, usage, cost, tuple(unpriced)))

    def on_event(self, event: Event) -> None:
        """Count what a cache hit, or a coalesced call that got the answer, saved: ``saved_tokens``, priced from
        ``saved_usage`` (or a ``saved_cost`` an event of one's own carries). Matched by type, subclasses included."""
        if not isinstance(event, CacheHit | CacheCoalesced) or getattr(event, "error", None) is not None:
            return
        tokens = getattr(event, "saved_tokens", 0)
        tokens = tokens if isinstance(tokens, int) else 0
        saved_cost = getattr(event, "saved_cost", None)
        if not isinstance(saved_cost, int | float):
            saved_usage = getattr(event, "saved_usage", None)
            saved_cost = self.prices(saved_usage) if isinstance(saved_usage, Mapping) else 0.0
            if isinstance(saved_usage, Mapping) and not tokens:
                tokens = sum(u.total for u in _token_usage(saved_usage).values())
        current = self._current.get()
        key = current[1] if current is not None and current[0] == event.pipeline else None
        for account in self._accounts(event.pipeline, key):
            account.saved_tokens += tokens
            account.saved_cost += float(saved_cost)

    # ------------------------------------------------------------------------------------------------ totals

    def total(self) -> CostTotals:
        """Totals over every call this tracker saw."""
        return self._total.snapshot()

    def by_pipeline(self) -> dict[str, CostTotals]:
        return {name: account.snapshot() for name, account in self._pipelines.items()}

    def by_key(self) -> dict[Hashable, CostTotals]:
        """Totals per ``key`` value (empty without a ``key`` function)."""
        return {key: account.snapshot() for key, account in self._keys.items()}

    def by_model(self) -> dict[str, CostTotals]:
        """Totals per model; ``calls`` counts the calls that used it (cache savings are not split by model)."""
        return {model: account.snapshot() for model, account in self._models.items()}

    def reset(self) -> None:
        """Forget every total."""
        self._total = _RunningTotals()
        self._pipelines.clear()
        self._keys.clear()
        self._models.clear()

    def describe(self) -> dict[str, Any]:
        return {"layer": "CostTracker", "name": self.name, "prices": repr(self.prices), "keyed": self.key is not None}
