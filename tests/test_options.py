"""Every options model takes a list wherever it takes a tuple (a range, a set of types): JSON and callers have lists."""

from __future__ import annotations

import importlib
import pkgutil
import re
from types import UnionType
from typing import Any, Union, get_args, get_origin

import pytest

import resilient_dspy
from resilient_dspy import Retry
from resilient_dspy._moved import MOVED
from resilient_dspy.core.options import Options
from resilient_dspy.faults import Fault, FaultStep
from resilient_dspy.middleware._shared.partitions import PartitionOptions
from resilient_dspy.middleware.adaptive_concurrency import AdaptiveConcurrencyOptions
from resilient_dspy.middleware.adaptive_throttle import AdaptiveThrottleOptions
from resilient_dspy.middleware.adaptive_timeout import AdaptiveTimeoutOptions
from resilient_dspy.middleware.breaker import CircuitBreakerOptions
from resilient_dspy.middleware.budget import BudgetOptions
from resilient_dspy.middleware.bulkhead import BulkheadOptions
from resilient_dspy.middleware.cache import CacheOptions
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.middleware.cache.backends.redis_backend import RedisBackendOptions
from resilient_dspy.middleware.canary import CanaryOptions
from resilient_dspy.middleware.chaos import ChaosOptions
from resilient_dspy.middleware.fallback import FallbackOptions, Static
from resilient_dspy.middleware.guard import GuardOptions, InputRules
from resilient_dspy.middleware.hedge import HedgeOptions, PercentileOptions
from resilient_dspy.middleware.ratelimit import Limit, RateLimiterOptions
from resilient_dspy.middleware.retry import RetryBudget, RetryOptions
from resilient_dspy.middleware.timeout import TimeoutOptions
from resilient_dspy.store.link import StoreOptions
from resilient_dspy.store.redis import RedisStoreOptions
from resilient_dspy.testing.chaos_server import Quota
from resilient_dspy.testing.fault_lm import FaultProfile

for _module in pkgutil.walk_packages(resilient_dspy.__path__, "resilient_dspy."):
    if _module.name not in MOVED:  # the deprecated aliases of moved modules define nothing
        importlib.import_module(_module.name)  # every Options subclass defined, wherever it lives

STATIC = Static(answer="x")


async def _program(question: str) -> str:
    return question


BASE: dict[tuple[type[Options], str], dict[str, Any]] = {
    (RateLimiterOptions, "limits"): {},
    (CacheOptions, "types"): {"backend": MemoryBackend()},
    (ChaosOptions, "script"): {},
    (ChaosOptions, "latency"): {},
    (ChaosOptions, "retry_after"): {"fault": "rate_limit"},
    (BudgetOptions, "alert_at"): {"tokens": 1000},
    (CanaryOptions, "weights"): {"candidates": (_program, _program)},
}
"""The other fields a model needs before one of its tuple fields can be tried."""

SAMPLES: dict[tuple[type[Options], str], tuple[Any, ...]] = {
    (InputRules, "required"): ("question",),
    (InputRules, "forbidden"): (re.compile("ignore previous"),),
    (FallbackOptions, "alternatives"): (STATIC, STATIC),
    (CanaryOptions, "candidates"): (_program, _program),
    (CanaryOptions, "weights"): (0.1, 0.2),
    (HedgeOptions, "alternatives"): (STATIC, STATIC),
    (BudgetOptions, "alert_at"): (0.5, 0.9),
    (ChaosOptions, "latency"): (0.1, 0.5),
    (ChaosOptions, "script"): (FaultStep(), FaultStep()),
    (ChaosOptions, "retry_after"): (0.5, 2.0),
    (FaultProfile, "retry_after"): (0.5, 2.0),
    (FaultProfile, "latency"): (0.1, 0.5),
    (RetryOptions, "retry_on"): (ValueError, KeyError),
    (CacheOptions, "types"): (Fault,),
    (RateLimiterOptions, "limits"): (Limit(amount=10, per=1.0), Limit(amount=100, per=60.0, unit="tokens")),
}
"""A valid tuple for every tuple-typed field of every options model (the completeness test keeps it whole)."""

NO_TUPLE_FIELDS = {
    AdaptiveConcurrencyOptions,
    AdaptiveThrottleOptions,
    Limit,
    TimeoutOptions,
    GuardOptions,
    RetryBudget,
    CircuitBreakerOptions,
    BulkheadOptions,
    PartitionOptions,
    Quota,
    RedisBackendOptions,
    AdaptiveTimeoutOptions,
    RedisStoreOptions,
    StoreOptions,
    PercentileOptions,
}


def options_models() -> set[type[Options]]:
    found: set[type[Options]] = set()
    pending = [Options]
    while pending:
        for subclass in pending.pop().__subclasses__():
            if subclass.__module__.startswith("resilient_dspy.") and subclass not in found:
                found.add(subclass)
                pending.append(subclass)
    return found


def tuple_fields(model: type[Options]) -> set[str]:
    def arms(annotation: Any) -> tuple[Any, ...]:
        if get_origin(annotation) in (Union, UnionType):
            return get_args(annotation)
        return (annotation,)

    return {
        name
        for name, field in model.model_fields.items()
        if any(get_origin(arm) in (tuple, frozenset, set) for arm in arms(field.annotation))
    }


def test_every_tuple_field_of_every_options_model_has_a_sample() -> None:
    """A new tuple field (or model) must join SAMPLES, so the list-acceptance test below covers it."""
    expected = {(model, name) for model in options_models() for name in tuple_fields(model)}
    assert expected == set(SAMPLES)
    assert {model for model in options_models() if not tuple_fields(model)} <= NO_TUPLE_FIELDS


@pytest.mark.parametrize(("model", "field"), sorted(SAMPLES, key=lambda k: (k[0].__name__, k[1])), ids=str)
def test_a_list_is_accepted_wherever_a_tuple_is(model: type[Options], field: str) -> None:
    """The same values as a list build the same options as the tuple."""
    sample = SAMPLES[(model, field)]
    base = BASE.get((model, field), {})
    from_tuple = model(**{**base, field: sample})
    from_list = model(**{**base, field: list(sample)})
    assert from_list == from_tuple
    assert getattr(from_list, field) == sample


def test_a_list_of_the_wrong_length_is_still_refused_as_a_range() -> None:
    with pytest.raises(ValueError, match="latency"):
        FaultProfile(latency=[0.1, 0.2, 0.3])


def test_options_validated_from_json_shaped_data_hold_tuples() -> None:
    """``model_validate`` of decoded JSON (lists only) gives the same tuples as the Python call."""
    assert FaultProfile.model_validate({"latency": [0, 1], "retry_after": None}).latency == (0.0, 1.0)


def test_retry_takes_a_list_of_exception_types() -> None:
    """``Retry(retry_on=[...])`` retries exactly those types, as the tuple would."""
    assert Retry(3, retry_on=[ValueError, KeyError]).options.retry_on == (ValueError, KeyError)


@pytest.mark.parametrize(
    "build",
    [
        lambda: __import__("resilient_dspy").Retry(retry_on=["x"]),
        lambda: __import__("resilient_dspy").Retry(retry_on=(int,)),
        lambda: __import__("resilient_dspy").Fallback(__import__("resilient_dspy").Static(answer="x"), on="x"),
    ],
)
def test_a_bad_value_is_reported_once_per_field_without_pydantic_internals(build: Any) -> None:
    from resilient_dspy.errors import ConfigurationError

    with pytest.raises(ConfigurationError) as caught:
        build()
    [(field, rule)] = caught.value.problems
    assert field.count(".") == 1  # Owner.field, no union member or schema tag in the path
    for internal in ("tuple[", "is-subclass", "callable:", "Value error", "function-"):
        assert internal not in f"{field}: {rule}"
    assert rule.count("(got ") == 1
