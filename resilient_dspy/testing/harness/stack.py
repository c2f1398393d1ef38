"""Pipeline configurations for chaos tests: a :class:`StackConfig` builds a fresh pipeline in the recommended
order, with checkpoints below the layers whose limits the invariants check."""

from __future__ import annotations

import random
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from resilient_dspy.core.clock import Clock
from resilient_dspy.core.pipeline import Pipeline
from resilient_dspy.errors import ResilienceWarning
from resilient_dspy.middleware.breaker import CircuitBreaker
from resilient_dspy.middleware.bulkhead import Bulkhead
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.fallback import Fallback, Static
from resilient_dspy.middleware.ratelimit import Limit, RateLimiter
from resilient_dspy.middleware.retry import Retry
from resilient_dspy.middleware.timeout import Timeout
from resilient_dspy.testing.harness.checkpoint import Checkpoint
from resilient_dspy.testing.harness.records import ProgramEntry

__all__ = ["Built", "StackConfig"]


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
