"""The Canary layer: route each call to stable (the layers below) or a candidate, judge candidates against stable,
roll back a worse one, and in shadow mode send copies that never answer."""

from __future__ import annotations

import asyncio
import logging
import random
import weakref
from collections.abc import Callable, Hashable
from typing import TYPE_CHECKING, Any, ClassVar

import dspy

from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.emit import emit_event
from resilient_dspy.core.health import LayerHealth
from resilient_dspy.core.layer import Layer
from resilient_dspy.core.options import Options, options_from
from resilient_dspy.core.pipeline import adapt_program
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.middleware.canary.events import (
    CanaryPromoted,
    CanaryRolledBack,
    CanaryRouted,
    CanarySnapshot,
    CandidateSnapshot,
    RouteStats,
    ShadowCompared,
    ShadowSkipped,
)
from resilient_dspy.middleware.canary.options import CanaryOptions, Mode
from resilient_dspy.middleware.canary.routes import (
    ACTIVE,
    PROMOTED,
    ROLLED_BACK,
    Route,
    Window,
    pick,
    sticky_point,
    verdict,
)
from resilient_dspy.middleware.canary.shadow import ShadowResult, Shadows, StableResult
from resilient_dspy.middleware.fallback import Alternative, Static, UseLM, UseProgram, is_user_mistake

if TYPE_CHECKING:
    from resilient_dspy.core.pipeline import Pipeline
    from resilient_dspy.events import Event

__all__ = ["STABLE", "Canary"]

logger = logging.getLogger("resilient_dspy.canary")

STABLE = "stable"
"""The name of the route through the layers below the Canary (the program it wraps)."""

_AUTOMATIC = frozenset({"error_rate", "latency"})


class Canary(Layer):
    """Send a share of calls (or, in shadow mode, a copy of them) to candidates; roll back a candidate worse than
    stable; ``promote()`` / ``rollback()`` by hand."""

    placement: ClassVar[str] = "canary"
    options_type: ClassVar[type[Options]] = CanaryOptions
    options: CanaryOptions

    def __init__(
        self,
        *candidates: Any,
        weights: tuple[float, ...] | None = None,
        mode: Mode = "canary",
        sticky: Callable[[Call], Hashable] | None = None,
        rng: random.Random | None = None,
        window: int = 100,
        window_seconds: float | None = None,
        min_calls: int = 20,
        max_error_rate_increase: float | None = 0.05,
        confidence: float | None = 0.95,
        max_latency_ratio: float | None = 1.5,
        min_latency_increase: float = 0.05,
        latency_percentile: float = 95.0,
        compare: Callable[[Any, Any], bool] | None = None,
        max_shadows: int = 10,
        shadow_timeout: float = 30.0,
        name: str | None = None,
    ) -> None:
        problems: list[tuple[str, str]] = []
        converted = [_as_candidate(candidate, index, problems) for index, candidate in enumerate(candidates)]
        try:
            self.options = options_from(CanaryOptions, "Canary", locals())
        except ConfigurationError as error:
            problems[:0] = error.problems
        alternatives = [alternative for alternative in converted if alternative is not None]
        seen = {STABLE}
        for index, alternative in enumerate(alternatives):
            if alternative.name in seen:
                problems.append((f"Canary.candidates[{index}]", f"the route name {alternative.name!r} is taken: name="))
            seen.add(alternative.name)
        if problems:
            raise ConfigurationError(problems)
        options = self.options
        self._routes = tuple(Route(a, share, options) for a, share in zip(alternatives, options.shares(), strict=True))
        self._stable = Window(options.window, options.window_seconds)
        self._stable_served = 0
        self._promoted: Route | None = None
        self._shadows = Shadows(options.max_shadows, options.shadow_timeout)
        self._pipelines: weakref.WeakSet[Pipeline] = weakref.WeakSet()

    def on_build(self, pipeline: Pipeline) -> None:
        self._pipelines.add(pipeline)

    # --------------------------------------------------------------------------------------- the call

    async def __call__(self, call: Call, next: Handler) -> Any:
        promoted = self._promoted
        if promoted is not None:
            return await self._serve(call, next, promoted)
        route = self._choose(call)
        if route is None:
            return await self._serve_stable(call, next)
        if self.options.mode == "shadow":
            return await self._serve_with_shadow(call, next, route)
        return await self._serve(call, next, route)

    def _choose(self, call: Call) -> Route | None:
        """The active candidate this call falls to, or None for stable."""
        if not any(route.status == ACTIVE for route in self._routes):
            return None
        options = self.options
        if options.sticky is not None:
            point = sticky_point(self.name, options.sticky(call))
        else:
            point = (options.rng or call.rng).random()
        return pick(self._routes, point)

    def _judging(self) -> bool:
        return self._promoted is None and any(route.status == ACTIVE for route in self._routes)

    async def _serve_stable(self, call: Call, next: Handler) -> Any:
        self._stable_served += 1
        self.emit(call, CanaryRouted, route=STABLE, shadow=False)
        if not self._judging():
            return await next(call)
        reached, started = call.record.attempts, call.clock.now()
        try:
            value = await next(call)
        except Exception as error:
            self._note(self._stable, call, reached, started, error)
            raise
        self._note(self._stable, call, reached, started, None)
        return value

    async def _serve(self, call: Call, next: Handler, route: Route) -> Any:
        """The candidate answers the caller; its error is the caller's (a Fallback above may serve instead)."""
        route.served += 1
        self.emit(call, CanaryRouted, route=route.name, shadow=False)
        record = call.record
        reached, started = record.attempts, call.clock.now()
        try:
            value = await route.alternative.run(call, next)
        except Exception as error:
            if record.served_by == "primary":
                record.served_by = route.name
            if route.status == ACTIVE and self._note(route.window, call, reached, started, error):
                self._judge(call, route)
            raise
        if record.served_by == "primary":
            record.served_by = route.name
        if route.status == ACTIVE and self._note(route.window, call, reached, started, None):
            self._judge(call, route)
        return value

    async def _serve_with_shadow(self, call: Call, next: Handler, route: Route) -> Any:
        """Stable answers the caller; a copy goes to ``route`` unless ``max_shadows`` copies are in flight."""
        shadows = self._shadows
        if shadows.full():
            route.skipped += 1
            self.emit(call, ShadowSkipped, candidate=route.name, in_flight=len(shadows.tasks))
            return await self._serve_stable(call, next)
        stable: asyncio.Future[StableResult] = asyncio.get_running_loop().create_future()
        task = shadows.start(call, route, next, stable, self._shadow_done)
        route.served += 1
        self._stable_served += 1
        self.emit(call, CanaryRouted, route=route.name, shadow=True)
        reached, started = call.record.attempts, call.clock.now()
        try:
            value = await next(call)
        except Exception as error:
            self._note(self._stable, call, reached, started, error)
            stable.set_result(StableResult(None, error, call.clock.now() - started))
            raise
        except BaseException:
            task.cancel()  # the caller is gone (cancelled): its copy goes with it
            raise
        self._note(self._stable, call, reached, started, None)
        stable.set_result(StableResult(value, None, call.clock.now() - started))
        return value

    def _shadow_done(self, call: Call, route: Route, result: ShadowResult) -> None:
        """Judge and report a finished shadow copy (``call`` is the copy)."""
        finished = result.stable
        matched: bool | None = None
        compare = self.options.compare
        if compare is not None and finished is not None and result.error is None and finished.error is None:
            try:
                matched = bool(compare(finished.value, result.value))
            except Exception:
                logger.exception("%s: compare= failed on shadow %r's answer", self.name, route.name)
        if matched is False:
            route.mismatches += 1
        if route.status == ACTIVE and result.reached:
            route.window.add(call.clock.now(), result.error is not None, result.latency)
            self._judge(call, route)
        self.emit(
            call,
            ShadowCompared,
            candidate=route.name,
            error=result.error,
            latency=result.latency,
            stable_latency=None if finished is None else finished.latency,
            stable_error=None if finished is None else finished.error,
            matched=matched,
        )

    def _note(self, window: Window, call: Call, reached: int, started: float, error: Exception | None) -> bool:
        """Add an outcome that judges the route (the program was reached, or a user mistake) to ``window``."""
        if call.record.attempts == reached and (error is None or not is_user_mistake(error)):
            return False  # a cache hit, an inner rejection: not the route's doing
        now = call.clock.now()
        window.add(now, error is not None, now - started)
        return True

    def _judge(self, call: Call, route: Route) -> None:
        percentile, now = self.options.latency_percentile, call.clock.now()
        stable, observed = self._stable.stats(now, percentile), route.window.stats(now, percentile)
        reason = verdict(stable, observed, self.options)
        if reason is not None:
            self._roll_back(call, route, reason, stable, observed)

    # --------------------------------------------------------------------------------------- manual control

    def promote(self, candidate: str | None = None) -> None:
        """Send every call to ``candidate`` (the only one when None) from now on: it has become the stable route."""
        route = self._route(candidate)
        for other in self._routes:
            if other is not route and other.status != ROLLED_BACK:
                self._roll_back(None, other, "superseded", None, None)
        route.status, route.reason = PROMOTED, None
        self._promoted = route
        logger.info("canary %s: %r promoted: it serves every call", self.name, route.name)
        self._announce(CanaryPromoted, candidate=route.name)

    def rollback(self, candidate: str | None = None) -> None:
        """Send ``candidate``'s calls (every candidate's when None) back to stable, a promoted one's included."""
        routes = self._routes if candidate is None else (self._route(candidate),)
        for route in routes:
            if route.status != ROLLED_BACK:
                self._roll_back(None, route, "manual", None, None)

    async def drain(self) -> None:
        """Wait until every shadow copy in flight has finished (each within ``shadow_timeout``)."""
        await self._shadows.drain()

    async def aclose(self) -> None:
        """Cancel every shadow copy in flight and wait until they are gone (at shutdown)."""
        await self._shadows.aclose()

    def _route(self, name: str | None) -> Route:
        if name is None and len(self._routes) == 1:
            return self._routes[0]
        for route in self._routes:
            if route.name == name:
                return route
        names = [route.name for route in self._routes]
        raise ValueError(f"canary {self.name}: name one of its candidates {names} (got {name!r})")

    def _roll_back(
        self, call: Call | None, route: Route, reason: str, stable: RouteStats | None, observed: RouteStats | None
    ) -> None:
        route.status, route.reason = ROLLED_BACK, reason
        if self._promoted is route:
            self._promoted = None
        if reason in _AUTOMATIC:
            logger.warning(
                "canary %s: %r rolled back (%s): candidate %s vs stable %s; all its traffic goes to stable",
                self.name,
                route.name,
                reason,
                observed,
                stable,
            )
        else:
            logger.info("canary %s: %r rolled back (%s)", self.name, route.name, reason)
        fields = {"candidate": route.name, "reason": reason, "stable": stable, "observed": observed}
        if call is not None:
            self.emit(call, CanaryRolledBack, **fields)
        else:
            self._announce(CanaryRolledBack, **fields)

    def _announce(self, kind: type[Event], **fields: Any) -> None:
        """Emit an event of manual control to every pipeline built with this canary."""
        for pipeline in list(self._pipelines):
            runtime = pipeline.runtime
            if runtime.listeners:
                emit_event(runtime, self.name, kind, **fields)

    # --------------------------------------------------------------------------------------- reports

    def _now(self) -> float:
        for pipeline in self._pipelines:
            try:
                return pipeline.runtime.clock.now()
            except RuntimeError:  # the loop clock outside a running loop
                break
        return float("-inf")  # no clock to read yet: forget nothing

    def snapshot(self) -> CanarySnapshot:
        """Each route's status, share, served calls and window figures now, and the shadows in flight."""
        now, percentile = self._now(), self.options.latency_percentile
        candidates = tuple(
            CandidateSnapshot(
                route.name,
                route.status,
                route.weight,
                route.served,
                route.window.stats(now, percentile),
                route.skipped,
                route.mismatches,
                route.reason,
            )
            for route in self._routes
        )
        stable_weight = 0.0 if self._promoted is not None else max(0.0, 1.0 - sum(c.weight for c in candidates))
        if self.options.mode == "shadow" and self._promoted is None:
            stable_weight = 1.0  # stable answers every call; candidates get copies
        stable = self._stable.stats(now, percentile)
        return CanarySnapshot(
            self.options.mode, stable_weight, self._stable_served, stable, candidates, len(self._shadows.tasks)
        )

    def health(self) -> LayerHealth:
        """Degraded after an automatic rollback (a release failed its canary: look at it); never down, as stable
        serves."""
        snapshot = self.snapshot()
        failed = any(c.rollback_reason in _AUTOMATIC for c in snapshot.candidates)
        details = {
            "mode": snapshot.mode,
            "stable_weight": snapshot.stable_weight,
            "candidates": {
                c.name: {
                    "status": c.status,
                    "weight": c.weight,
                    "error_rate": c.window.error_rate,
                    "latency": c.window.latency,
                    "reason": c.rollback_reason,
                }
                for c in snapshot.candidates
            },
            "shadows_in_flight": snapshot.shadows_in_flight,
        }
        return LayerHealth(self.name, "degraded" if failed else "ok", details)

    def describe(self) -> dict[str, Any]:
        """The options with each candidate's table (as a Fallback's alternatives), functions by their repr, and each
        route's status."""
        options = self.options.model_dump()
        options["candidates"] = [route.alternative.describe() for route in self._routes]
        for field in ("sticky", "rng", "compare"):
            if options[field] is not None:
                options[field] = repr(options[field])
        state = {route.name: route.status for route in self._routes}
        return {"layer": "Canary", "name": self.name, "options": options, "routes": state}


def _as_candidate(candidate: Any, index: int, problems: list[tuple[str, str]]) -> Alternative | None:
    """A route from what Fallback takes as an alternative (``UseLM``, ``UseProgram``, an LM or a program)."""
    field = f"Canary.candidates[{index}]"
    if isinstance(candidate, Static | dspy.Prediction):
        problems.append((field, "a static answer cannot be judged against stable: give UseLM or UseProgram"))
        return None
    if isinstance(candidate, Alternative):
        if candidate.on is not None:
            problems.append((field, "on= narrows the errors a fallback handles; a canary route takes every call"))
            return None
        return candidate
    if isinstance(candidate, dspy.BaseLM):
        return UseLM(candidate)
    if adapt_program(candidate, []) is None:
        problems.append(
            (field, f"must be UseLM/UseProgram, a dspy.LM, a program or a Pipeline (got {candidate!r:.80})")
        )
        return None
    return UseProgram(candidate)
