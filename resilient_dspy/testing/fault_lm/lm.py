"""The fault-injecting DSPy LM: a real ``dspy.LM`` whose custom engines answer locally or fail on purpose.

Faults are raised as ``dspy.lm15`` errors, so DSPy's own error mapping turns them into ``LMRateLimitError``
(with ``retry_after``), ``LMServerError`` and friends exactly as for an HTTP provider. What each request does comes
from :mod:`~resilient_dspy.testing.fault_lm.schedule`, its answer from :mod:`~resilient_dspy.testing.fault_lm.answers`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any

import dspy
from dspy import lm15

from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.core.options import build_options
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.faults import FAULT_STATUS, Fault, FaultStep, ScriptEntry, parse_steps, truncate_answer
from resilient_dspy.testing.fault_lm.answers import Answers, RenderedAnswer, count_tokens, render_answer
from resilient_dspy.testing.fault_lm.schedule import (
    CANCELLED_BY_CALLER,
    Drawn,
    FaultProfile,
    FaultSchedule,
    JournalEntry,
)

__all__ = ["FaultInjectingLM"]

_LM15_ERRORS: dict[Fault, Callable[..., Exception]] = {
    Fault.RATE_LIMIT: lm15.RateLimitError,
    Fault.SERVER_ERROR: lm15.ServerError,
    Fault.TIMEOUT: lm15.TimeoutError,
    Fault.TRANSPORT: lm15.TransportError,
    Fault.CONTEXT_WINDOW: lm15.ContextLengthError,
    Fault.AUTH: lm15.AuthError,
    Fault.INVALID_JSON: lm15.ProviderError,
}


def _system_text(request: lm15.Request) -> str:
    if isinstance(request.system, str):
        return request.system
    return "".join(getattr(part, "text", "") for part in (request.system or ()))


class _FaultCore:
    """State shared by the sync and async engines: the schedule, the answers and the journal."""

    def __init__(
        self,
        model: str,
        profile: FaultProfile,
        script: Iterable[FaultStep],
        seed: int | None,
        answers: Answers | None,
        clock: Clock,
    ) -> None:
        self.model = model
        self.schedule = FaultSchedule(profile, script, seed)
        self.answers = answers
        self.clock = clock
        self.journal: list[JournalEntry] = []
        self.chunk_latency = 0.0
        self.in_flight = 0
        self.max_in_flight = 0

    @property
    def profile(self) -> FaultProfile:
        return self.schedule.profile

    @property
    def script(self) -> deque[FaultStep]:
        return self.schedule.script

    @property
    def faults(self) -> Counter[Fault]:
        return self.schedule.faults

    def render(self, request: lm15.Request, malformed: bool = False) -> RenderedAnswer:
        user = request.messages[-1].text or "" if request.messages else ""
        return render_answer(_system_text(request), user, answers=self.answers, malformed=malformed)

    def failure(self, step: Drawn) -> Exception | None:
        """The lm15 error an engine raises for ``step`` (DSPy maps it to its LMError), or None."""
        make = _LM15_ERRORS.get(step.fault)
        if make is None:
            return None
        message = f"injected {step.fault.value} by {self.model}"
        return make(message, status=step.status, retry_after=step.retry_after)

    def respond(self, request: lm15.Request, step: Drawn) -> lm15.Response:
        answer = self.render(request, malformed=step.fault is Fault.MALFORMED)
        cut = step.fault is Fault.TRUNCATED
        if cut:
            answer = replace(answer, text=truncate_answer(answer.text))
        prompt = "".join(m.text or "" for m in request.messages) + _system_text(request)
        input_tokens, output_tokens = count_tokens(prompt), count_tokens(answer.text)
        usage = lm15.Usage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )
        self.record(request, step, input_tokens, output_tokens, answer)
        return lm15.Response(
            id=f"fault-{len(self.journal)}",
            model=self.model,
            message=lm15.Message.assistant([lm15.TextPart(answer.text)]),
            finish_reason="length" if cut else "stop",
            usage=usage,
        )

    def now(self) -> float:
        """The clock's time; ``time.monotonic()`` where no event loop runs (sync code, a worker thread).

        asyncio's default loop clock is ``time.monotonic()`` too, so the journal stays on one time line then.
        """
        try:
            return self.clock.now()
        except RuntimeError:  # LoopClock outside a running loop: the sync engine called from sync code or a thread
            return time.monotonic()

    def record(
        self,
        request: lm15.Request,
        step: Drawn,
        input_tokens: int = 0,
        output_tokens: int = 0,
        answer: RenderedAnswer | None = None,
        detail: str = "",
    ) -> None:
        rendered = answer or self.render(request, malformed=True)
        self.journal.append(
            JournalEntry(
                self.now(),
                self.model,
                step.fault,
                rendered.question,
                input_tokens,
                output_tokens,
                latency=step.latency,
                status=step.status,
                retry_after=step.retry_after,
                adapter=answer.adapter if answer is not None else None,
                detail=detail,
                temperature=request.config.temperature,
                max_tokens=request.config.max_tokens,
            )
        )


def _chunked(response: lm15.Response) -> Iterator[Any]:
    """The response as stream events, its text one word (and the space after it) per delta, as a provider streams."""
    for event in lm15.response_to_events(response):
        delta = getattr(event, "delta", None)
        if not isinstance(delta, lm15.TextDelta) or not delta.text:
            yield event
            continue
        for index, match in enumerate(re.finditer(r"\s*\S+\s*|\s+", delta.text)):
            first = index == 0
            yield dataclasses.replace(
                event,
                delta=dataclasses.replace(
                    delta,
                    text=match.group(),
                    logprobs=delta.logprobs if first else (),
                    logprobs_complete=delta.logprobs_complete if first else True,
                ),
            )


class _AsyncEngine:
    def __init__(self, core: _FaultCore) -> None:
        self.core = core

    async def complete(self, request: lm15.Request) -> lm15.Response:
        core = self.core
        step = core.schedule.draw()
        core.in_flight += 1
        core.max_in_flight = max(core.max_in_flight, core.in_flight)
        recorded = False
        try:
            if step.latency:
                await core.clock.sleep(step.latency)
            if step.fault is Fault.HANG:
                core.record(request, step)
                recorded = True
                await asyncio.Event().wait()
            error = core.failure(step)
            recorded = True
            if error is not None:
                core.record(request, step)
                raise error
            return core.respond(request, step)
        except asyncio.CancelledError:
            if not recorded:
                core.record(request, step, detail=CANCELLED_BY_CALLER)
            raise
        finally:
            core.in_flight -= 1

    async def stream(self, request: lm15.Request) -> AsyncIterator[Any]:
        response = await self.complete(request)
        pause = self.core.chunk_latency
        for index, event in enumerate(_chunked(response)):
            if pause and index > 1:
                await self.core.clock.sleep(pause)
            yield event

    async def aclose(self) -> None:
        return None


class _SyncEngine:
    """The synchronous twin (DSPy requires one): same schedule; a hang becomes a timeout error."""

    def __init__(self, core: _FaultCore) -> None:
        self.core = core

    def complete(self, request: lm15.Request) -> lm15.Response:
        core = self.core
        step = core.schedule.draw()
        if step.latency:
            time.sleep(step.latency)
        if step.fault is Fault.HANG:
            step = replace(step, fault=Fault.TIMEOUT, status=FAULT_STATUS[Fault.TIMEOUT])
        error = core.failure(step)
        if error is not None:
            core.record(request, step)
            raise error
        return core.respond(request, step)

    def stream(self, request: lm15.Request) -> Iterator[Any]:
        response = self.complete(request)
        pause = self.core.chunk_latency
        for index, event in enumerate(_chunked(response)):
            if pause and index > 1:
                time.sleep(pause)
            yield event

    def close(self) -> None:
        return None


class FaultInjectingLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` that answers locally and injects faults; ``journal`` records every request.

    ``num_retries`` defaults to 0 and DSPy's response cache to off, as an LM under a pipeline should be. It works from
    async code, sync code and worker threads alike. Streamed (under ``dspy.streamify``), an answer comes one word per
    chunk, ``chunk_latency`` seconds apart (on its clock), after the request's own latency.
    """

    def __init__(
        self,
        model: str = "fault/local",
        *,
        profile: FaultProfile | Mapping[str, Any] | None = None,
        script: Iterable[ScriptEntry] = (),
        seed: int | None = 0,
        answers: Answers | None = None,
        clock: Clock | None = None,
        cache: bool = False,
        num_retries: int = 0,
        chunk_latency: float = 0.0,
        **kwargs: Any,
    ) -> None:
        model = model.removeprefix("custom/")  # the name DSPy shows (``lm.model``) builds the same LM again
        steps = parse_steps(script, "FaultInjectingLM.script")
        if not isinstance(profile, FaultProfile):
            profile = build_options(FaultProfile, "FaultProfile", dict(profile or {}))
        if isinstance(chunk_latency, bool) or not isinstance(chunk_latency, int | float) or chunk_latency < 0:
            raise ConfigurationError([("FaultInjectingLM.chunk_latency", f"must be seconds >= 0 ({chunk_latency!r})")])
        self.core = _FaultCore(model, profile, steps, seed, answers, clock or LoopClock())
        self.core.chunk_latency = float(chunk_latency)
        super().__init__(
            f"custom/{model}",
            engine=_SyncEngine(self.core),
            async_engine=_AsyncEngine(self.core),
            cache=cache,
            num_retries=num_retries,
            **kwargs,
        )

    @property
    def journal(self) -> list[JournalEntry]:
        return self.core.journal

    @property
    def requests(self) -> int:
        """How many requests reached the LM (answered, failed, or cancelled by the caller)."""
        return len(self.core.journal)

    @property
    def faults(self) -> Counter[Fault]:
        return self.core.faults

    @property
    def pending(self) -> tuple[FaultStep, ...]:
        """The scripted steps not yet consumed, in order."""
        return tuple(self.core.script)

    def push(self, *faults: ScriptEntry) -> None:
        """Append faults (names, None for ok, or FaultSteps) to the exact script, consumed before the profile."""
        self.core.schedule.push(parse_steps(faults, "FaultInjectingLM.push"))
