"""A fault-injecting DSPy LM: a real ``dspy.LM`` whose custom engine answers locally or fails on purpose.

Faults are raised as ``dspy.lm15`` errors, so DSPy's own error mapping turns them into ``LMRateLimitError``
(with ``retry_after``), ``LMServerError`` and friends exactly as for an HTTP provider. Answers follow the
adapter's format for the signature it is asked (Chat or JSON), report token usage, and are deterministic
per question. Faults come from an exact ``script`` first, then from a seeded random ``FaultProfile``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import dspy
from dspy import lm15
from pydantic import Field, model_validator

from resilient_dspy.clock import Clock, LoopClock
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.options import Options, build_options

__all__ = ["Fault", "FaultInjectingLM", "FaultProfile", "JournalEntry"]


class Fault(StrEnum):
    """What one LM request does."""

    OK = "ok"
    RATE_LIMIT = "rate_limit"
    SERVER_ERROR = "server_error"
    TIMEOUT = "timeout"
    TRANSPORT = "transport"
    HANG = "hang"
    MALFORMED = "malformed"
    CONTEXT_WINDOW = "context_window"
    AUTH = "auth"


class FaultProfile(Options):
    """Per-request probabilities of each fault (the rest answer normally) and the latency range."""

    rate_limit: float = Field(default=0.0, ge=0, le=1)
    server_error: float = Field(default=0.0, ge=0, le=1)
    timeout: float = Field(default=0.0, ge=0, le=1)
    transport: float = Field(default=0.0, ge=0, le=1)
    hang: float = Field(default=0.0, ge=0, le=1)
    malformed: float = Field(default=0.0, ge=0, le=1)
    context_window: float = Field(default=0.0, ge=0, le=1)
    retry_after: tuple[float, float] | None = Field(
        default=(0.5, 2.0), description="Retry-After range (s) sent with rate limits; None sends none."
    )
    latency: tuple[float, float] = Field(default=(0.0, 0.0), description="Answer latency range (s).")

    @model_validator(mode="after")
    def _check(self) -> FaultProfile:
        total = sum(self.rates().values())
        if total > 1 + 1e-9:
            raise ValueError(f"fault probabilities must sum to at most 1 (got {total:g})")
        for name in ("retry_after", "latency"):
            span = getattr(self, name)
            if span is not None and not 0 <= span[0] <= span[1]:
                raise ValueError(f"{name} must be (low, high) with 0 <= low <= high (got {span})")
        return self

    def rates(self) -> dict[Fault, float]:
        return {
            Fault.RATE_LIMIT: self.rate_limit,
            Fault.SERVER_ERROR: self.server_error,
            Fault.TIMEOUT: self.timeout,
            Fault.TRANSPORT: self.transport,
            Fault.HANG: self.hang,
            Fault.MALFORMED: self.malformed,
            Fault.CONTEXT_WINDOW: self.context_window,
        }


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request the LM saw and what it did with it."""

    time: float
    model: str
    fault: Fault
    question: str
    input_tokens: int
    output_tokens: int


_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n(.*?)(?:\n\n|\nAll interactions|\Z)", re.S)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \(([^)]*)\)", re.M)
_INPUT_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)


_ERRORS: dict[Fault, Callable[..., Exception]] = {
    Fault.RATE_LIMIT: lm15.RateLimitError,
    Fault.SERVER_ERROR: lm15.ServerError,
    Fault.TIMEOUT: lm15.TimeoutError,
    Fault.TRANSPORT: lm15.TransportError,
    Fault.CONTEXT_WINDOW: lm15.ContextLengthError,
    Fault.AUTH: lm15.AuthError,
}
_STATUS = {
    Fault.RATE_LIMIT: 429,
    Fault.SERVER_ERROR: 503,
    Fault.TIMEOUT: 504,
    Fault.CONTEXT_WINDOW: 400,
    Fault.AUTH: 401,
}


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


class _FaultCore:
    """State shared by the sync and async engines: the schedule, the answers and the journal."""

    def __init__(
        self,
        model: str,
        profile: FaultProfile,
        script: Iterable[Fault | str],
        seed: int | None,
        answers: Mapping[str, str] | Callable[[str], str] | None,
        clock: Clock,
    ) -> None:
        self.model = model
        self.profile = profile
        self.script: deque[Fault] = deque(Fault(f) for f in script)
        self.rng = random.Random(seed)
        self.answers = answers
        self.clock = clock
        self.journal: list[JournalEntry] = []
        self.faults: Counter[Fault] = Counter()
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()

    def next_fault(self) -> tuple[Fault, float, float | None]:
        """The fault for the next request, its latency and its retry-after (all drawn under one lock)."""
        with self._lock:
            profile = self.profile
            if self.script:
                fault = self.script.popleft()
            else:
                roll, fault = self.rng.random(), Fault.OK
                for candidate, rate in profile.rates().items():
                    if roll < rate:
                        fault = candidate
                        break
                    roll -= rate
            latency = self.rng.uniform(*profile.latency)
            retry_after = None if profile.retry_after is None else round(self.rng.uniform(*profile.retry_after), 3)
            self.faults[fault] += 1
            return fault, latency, retry_after

    def answer_text(self, request: lm15.Request, fault: Fault) -> tuple[str, str]:
        """The reply in the adapter's format (or malformed on purpose), and the question it answers."""
        system = (
            request.system
            if isinstance(request.system, str)
            else "".join(getattr(p, "text", "") for p in (request.system or ()))
        )
        user = request.messages[-1].text or "" if request.messages else ""
        inputs = dict(_INPUT_BLOCK.findall(user))
        question = next(iter(inputs.values()), user).strip()
        if fault is Fault.MALFORMED:
            return "Sorry, I lost the format: the answer is somewhere around here.", question
        block = _OUTPUT_FIELDS.search(system)
        fields = _FIELD_LINE.findall(block.group(1)) if block else [("answer", "str")]
        values = {name: self._value(name, kind, question) for name, kind in fields}
        if "[[ ## completed ## ]]" in system:
            body = "\n\n".join(f"[[ ## {name} ## ]]\n{value}" for name, value in values.items())
            return f"{body}\n\n[[ ## completed ## ]]", question
        return json.dumps(values), question

    def _value(self, name: str, kind: str, question: str) -> Any:
        digest = int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)
        kind = kind.lower()
        if kind.startswith("int"):
            return digest % 100
        if kind.startswith("float"):
            return round((digest % 1000) / 1000, 3)
        if kind.startswith("bool"):
            return bool(digest % 2)
        if kind.startswith("list"):
            return [f"item {digest % 7}"]
        if name == "reasoning":
            return f"Recall what is known about: {question[:60]}. Then answer briefly."
        answers = self.answers
        if callable(answers):
            return answers(question)
        if answers is not None and question in answers:
            return answers[question]
        return f"A local answer #{digest % 10_000} to: {question[:60]}"

    def failure(self, fault: Fault, retry_after: float | None) -> Exception | None:
        """The lm15 error an engine raises for ``fault`` (DSPy maps it to its LMError), or None."""
        make = _ERRORS.get(fault)
        if make is None:
            return None
        status = _STATUS.get(fault)
        retry_after = retry_after if fault is Fault.RATE_LIMIT else None
        return make(f"injected {fault.value} by {self.model}", status=status, retry_after=retry_after)

    def respond(self, request: lm15.Request, fault: Fault) -> lm15.Response:
        text, question = self.answer_text(request, fault)
        prompt = "".join(m.text or "" for m in request.messages) + str(request.system or "")
        usage = lm15.Usage(input_tokens=_tokens(prompt), output_tokens=_tokens(text))
        usage = lm15.Usage(
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            total_tokens=(usage.input_tokens or 0) + (usage.output_tokens or 0),
        )
        self.journal.append(
            JournalEntry(
                self.clock.now(), self.model, fault, question, usage.input_tokens or 0, usage.output_tokens or 0
            )
        )
        return lm15.Response(
            id=f"fault-{len(self.journal)}",
            model=self.model,
            message=lm15.Message.assistant([lm15.TextPart(text)]),
            finish_reason="stop",
            usage=usage,
        )

    def record_failure(self, request: lm15.Request, fault: Fault) -> None:
        _, question = self.answer_text(request, Fault.MALFORMED)
        self.journal.append(JournalEntry(self.clock.now(), self.model, fault, question, 0, 0))


class _AsyncEngine:
    def __init__(self, core: _FaultCore) -> None:
        self.core = core

    async def complete(self, request: lm15.Request) -> lm15.Response:
        core = self.core
        fault, latency, retry_after = core.next_fault()
        core.in_flight += 1
        core.max_in_flight = max(core.max_in_flight, core.in_flight)
        try:
            if latency:
                await core.clock.sleep(latency)
            if fault is Fault.HANG:
                core.record_failure(request, fault)
                await asyncio.Event().wait()
            error = core.failure(fault, retry_after)
            if error is not None:
                core.record_failure(request, fault)
                raise error
            return core.respond(request, fault)
        finally:
            core.in_flight -= 1

    def stream(self, request: lm15.Request) -> Any:
        return lm15.response_to_events(self.complete(request))  # pragma: no cover - streaming is not faulted yet

    async def aclose(self) -> None:
        return None


class _SyncEngine:
    """The synchronous twin (DSPy requires one): same schedule; a hang becomes a timeout error."""

    def __init__(self, core: _FaultCore) -> None:
        self.core = core

    def complete(self, request: lm15.Request) -> lm15.Response:
        core = self.core
        fault, latency, retry_after = core.next_fault()
        if latency:
            time.sleep(latency)
        if fault is Fault.HANG:
            fault = Fault.TIMEOUT
        error = core.failure(fault, retry_after)
        if error is not None:
            core.record_failure(request, fault)
            raise error
        return core.respond(request, fault)

    def stream(self, request: lm15.Request) -> Any:
        return lm15.response_to_events(self.complete(request))

    def close(self) -> None:
        return None


def _parse_faults(faults: Iterable[Fault | str], field: str) -> list[Fault]:
    """Faults from names, all or none: an unknown name is a ConfigurationError listing the known ones."""
    faults = list(faults)
    known = [kind.value for kind in Fault]
    unknown = [f for f in faults if not isinstance(f, Fault) and f not in known]
    if unknown:
        raise ConfigurationError([(field, f"unknown fault(s) {unknown}; known: {', '.join(known)}")])
    return [Fault(f) for f in faults]


class FaultInjectingLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` that answers locally and injects faults; ``journal`` records every request.

    ``num_retries`` defaults to 0 and DSPy's response cache to off, as an LM under a pipeline should be.
    """

    def __init__(
        self,
        model: str = "fault/local",
        *,
        profile: FaultProfile | Mapping[str, Any] | None = None,
        script: Iterable[Fault | str] = (),
        seed: int | None = 0,
        answers: Mapping[str, str] | Callable[[str], str] | None = None,
        clock: Clock | None = None,
        cache: bool = False,
        num_retries: int = 0,
        **kwargs: Any,
    ) -> None:
        faults = _parse_faults(script, "FaultInjectingLM.script")
        if not isinstance(profile, FaultProfile):
            profile = build_options(FaultProfile, "FaultProfile", dict(profile or {}))
        self.core = _FaultCore(model, profile, faults, seed, answers, clock or LoopClock())
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
        """How many requests reached the LM (answered or failed)."""
        return len(self.core.journal)

    @property
    def faults(self) -> Counter[Fault]:
        return self.core.faults

    def push(self, *faults: Fault | str) -> None:
        """Append faults to the exact script (consumed before the random profile)."""
        self.core.script.extend(_parse_faults(faults, "FaultInjectingLM.push"))
