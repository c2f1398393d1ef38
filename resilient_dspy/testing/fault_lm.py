"""A fault-injecting DSPy LM: a real ``dspy.LM`` whose custom engine answers locally or fails on purpose.

Faults are raised as ``dspy.lm15`` errors, so DSPy's own error mapping turns them into ``LMRateLimitError``
(with ``retry_after``), ``LMServerError`` and friends exactly as for an HTTP provider. Answers follow the
adapter's format for the signature it is asked (Chat or JSON), report token usage, and are deterministic
per question. Faults come from an exact ``script`` first, then from a seeded random ``FaultProfile``.

The fault vocabulary (:class:`Fault`, :class:`FaultStep`, :func:`fault_error`) lives in :mod:`resilient_dspy.faults`,
shared with the ``Chaos`` middleware; the profile, the schedule that draws from it and the answer renderer are
shared with the chaos HTTP server.
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
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

import dspy
from dspy import lm15
from pydantic import Field, model_validator

from resilient_dspy.core.clock import Clock, LoopClock
from resilient_dspy.core.options import Options, build_options
from resilient_dspy.faults import (
    FAULT_STATUS,
    MALFORMED_TEXT,
    Fault,
    FaultStep,
    ScriptEntry,
    fault_error,
    parse_steps,
)

__all__ = [
    "Drawn",
    "Fault",
    "FaultInjectingLM",
    "FaultProfile",
    "FaultSchedule",
    "FaultStep",
    "JournalEntry",
    "RenderedAnswer",
    "ScriptEntry",
    "fault_error",
    "parse_steps",
    "render_answer",
]

Answers = Mapping[str, str] | Callable[[str], str]


class FaultProfile(Options):
    """Per-request probabilities of each fault (the rest answer normally) and the latency range."""

    rate_limit: float = Field(default=0.0, ge=0, le=1)
    server_error: float = Field(default=0.0, ge=0, le=1)
    timeout: float = Field(default=0.0, ge=0, le=1)
    transport: float = Field(default=0.0, ge=0, le=1)
    hang: float = Field(default=0.0, ge=0, le=1)
    malformed: float = Field(default=0.0, ge=0, le=1)
    context_window: float = Field(default=0.0, ge=0, le=1)
    invalid_json: float = Field(default=0.0, ge=0, le=1, description="Probability of a 200 whose body is not JSON.")
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
            Fault.INVALID_JSON: self.invalid_json,
        }


@dataclass(frozen=True, slots=True)
class Drawn:
    """What one request will do, fully resolved: the fault, its latency, Retry-After and HTTP-like status."""

    fault: Fault
    latency: float = 0.0
    retry_after: float | None = None
    status: int | None = None


class FaultSchedule:
    """The next requests' faults: an exact script first, then a seeded random profile (thread-safe)."""

    def __init__(self, profile: FaultProfile, script: Iterable[FaultStep] = (), seed: int | None = 0) -> None:
        self.profile = profile
        self.script: deque[FaultStep] = deque(script)
        self.rng = random.Random(seed)
        self.faults: Counter[Fault] = Counter()
        self._lock = threading.Lock()

    def draw(self) -> Drawn:
        """The next request's fault, with its latency, Retry-After (rate limits) and HTTP status resolved."""
        with self._lock:
            profile = self.profile
            scripted = self.script.popleft() if self.script else None
            if scripted is not None:
                fault = scripted.fault
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
        if scripted is not None:
            latency = latency if scripted.latency is None else scripted.latency
            retry_after = retry_after if scripted.retry_after is None else scripted.retry_after
        status = scripted.status if scripted is not None and scripted.status is not None else FAULT_STATUS.get(fault)
        return Drawn(fault, latency, retry_after if fault is Fault.RATE_LIMIT else None, status)

    def push(self, steps: Iterable[FaultStep]) -> None:
        with self._lock:
            self.script.extend(steps)

    def replace(self, steps: Iterable[FaultStep]) -> None:
        with self._lock:
            self.script = deque(steps)


CANCELLED_BY_CALLER = "cancelled by the caller"  # a JournalEntry.detail: its fault never took effect


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """One request and what was done with it; ``time`` is when its fault or answer took effect (after latency)."""

    time: float
    model: str
    fault: Fault
    question: str
    input_tokens: int
    output_tokens: int
    latency: float = 0.0
    status: int | None = None
    retry_after: float | None = None
    adapter: str | None = None
    detail: str = ""


# --- answers -------------------------------------------------------------------------------------------

_OUTPUT_FIELDS = re.compile(r"Your output fields are:\n(.*?)(?:\n\n|\nAll interactions|\Z)", re.S)
_FIELD_LINE = re.compile(r"^\d+\. `(\w+)` \((.*?)\):", re.M)
_INPUT_BLOCK = re.compile(r"\[\[ ## (\w+) ## \]\]\n(.*?)(?=\n\n\[\[ ## |\n\nRespond with|\Z)", re.S)
_CHAT_NOTE = re.compile(r"^\{(\w+)\}\s+# note: the value you produce must (.*)$", re.M)
_JSON_NOTE = re.compile(r'^\s*"(\w+)": "\{\1\}\s+# note: the value you produce must (.*?)",?$', re.M)
_SCHEMA_NOTE = "adhere to the JSON schema: "
_CHOICE_NOTE = "exactly match (no extra characters) one of: "
_SIMPLE_TYPES = {"int": "integer", "float": "number", "bool": "boolean", "str": "string"}


@dataclass(frozen=True, slots=True)
class RenderedAnswer:
    """A reply in the adapter's format: its text, the question it answers, and which format (chat or json)."""

    text: str
    question: str
    adapter: str


def _digest(question: str) -> int:
    return int(hashlib.sha256(question.encode()).hexdigest()[:8], 16)


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _note_schema(note: str) -> dict[str, Any] | None:
    if note.startswith(_SCHEMA_NOTE):
        try:
            schema = json.loads(note[len(_SCHEMA_NOTE) :])
        except ValueError:
            return None
        return schema if isinstance(schema, dict) else None
    if note.startswith(_CHOICE_NOTE):
        return {"enum": note[len(_CHOICE_NOTE) :].split("; ")}
    return None


def _prompt_fields(system: str) -> dict[str, dict[str, Any]]:
    """Output field name → JSON schema, from the adapter's field list and its per-field notes."""
    block = _OUTPUT_FIELDS.search(system)
    if block is None:
        return {"answer": {"type": "string"}}
    fields: dict[str, dict[str, Any]] = {}
    for name, kind in _FIELD_LINE.findall(block.group(1)):
        base = kind.split("[", 1)[0].lower()
        if base in _SIMPLE_TYPES:
            fields[name] = {"type": _SIMPLE_TYPES[base]}
        elif base == "list":
            fields[name] = {"type": "array", "items": {"type": "string"}}
        else:
            fields[name] = {"type": "string"}
    notes = {name: note for name, note in _CHAT_NOTE.findall(system)}
    for name, escaped in _JSON_NOTE.findall(system):
        try:
            notes[name] = json.loads(f'"{escaped}"')
        except ValueError:
            continue
    for name, note in notes.items():
        schema = _note_schema(note)
        if name in fields and schema is not None:
            fields[name] = schema
    return fields


class _Values:
    """Deterministic values for a JSON schema, derived from the question (and the user's answers for text)."""

    def __init__(self, question: str, answers: Answers | None, root: Mapping[str, Any]) -> None:
        self.question = question
        self.digest = _digest(question)
        self.answers = answers
        self.defs: Mapping[str, Any] = root.get("$defs", {}) if isinstance(root, Mapping) else {}

    def given(self) -> str | None:
        answers = self.answers
        if callable(answers):
            return answers(self.question)
        if answers is not None and self.question in answers:
            return answers[self.question]
        return None

    def text(self, name: str) -> str:
        if name == "reasoning":
            return f"Recall what is known about: {self.question[:60]}. Then answer briefly."
        given = self.given()
        return given if given is not None else f"A local answer #{self.digest % 10_000} to: {self.question[:60]}"

    def field(self, schema: Mapping[str, Any], name: str) -> Any:
        """A top-level output field: the user's answer wins for every non-numeric, non-list field."""
        if name != "reasoning" and schema.get("type") not in ("integer", "number", "boolean", "array"):
            given = self.given()
            if given is not None:
                return given
        return self.value(schema, name)

    def value(self, schema: Mapping[str, Any], name: str, nested: bool = False) -> Any:
        digest = self.digest
        ref = schema.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            return self.value(self.defs.get(ref.rsplit("/", 1)[1], {}), name, nested)
        if "const" in schema:
            return schema["const"]
        if schema.get("enum"):
            options = list(schema["enum"])
            return options[digest % len(options)]
        for key in ("anyOf", "oneOf"):
            options = [o for o in schema.get(key, ()) if isinstance(o, Mapping) and o.get("type") != "null"]
            if options:
                return self.value(options[0], name, nested)
        kind = schema.get("type")
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "string")
        if kind == "integer":
            return digest % 100
        if kind == "number":
            return round((digest % 1000) / 1000, 3)
        if kind == "boolean":
            return bool(digest % 2)
        if kind == "null":
            return None
        if kind == "array":
            items = schema.get("items")
            return [self.value(items if isinstance(items, Mapping) else {"type": "string"}, name, True)]
        if kind == "object" or "properties" in schema:
            properties = schema.get("properties")
            if isinstance(properties, Mapping):
                return {key: self.value(sub, key, True) for key, sub in properties.items()}
            extra = schema.get("additionalProperties")
            return {"key": self.value(extra, name, True)} if isinstance(extra, Mapping) else {}
        return f"item {digest % 7}" if nested else self.text(name)


def _chat_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, list | dict) else f"{value}"


def render_answer(
    system: str,
    user: str,
    *,
    answers: Answers | None = None,
    schema: Mapping[str, Any] | None = None,
    json_mode: bool | None = None,
    malformed: bool = False,
) -> RenderedAnswer:
    """The reply a well-behaved model would give to a DSPy prompt (or a malformed one on demand).

    Output fields and their types come from the adapter's instructions in ``system`` (or from a JSON
    ``schema``, as sent in ``response_format``); the question is the first input field of ``user``. The
    format is Chat's ``[[ ## field ## ]]`` sections when the prompt asks for them, else JSON.
    """
    inputs = dict(_INPUT_BLOCK.findall(user))
    question = next(iter(inputs.values()), user).strip()
    chat = "[[ ## completed ## ]]" in system if json_mode is None else not json_mode
    adapter = "chat" if chat else "json"
    if malformed:
        return RenderedAnswer(MALFORMED_TEXT, question, adapter)
    properties = schema.get("properties") if schema is not None else None
    fields: Mapping[str, Mapping[str, Any]]
    if isinstance(properties, Mapping) and properties:
        fields = {name: sub for name, sub in properties.items() if isinstance(sub, Mapping)}
    else:
        fields = _prompt_fields(system)
    values = _Values(question, answers, schema or {})
    rendered = {name: values.field(sub, name) for name, sub in fields.items()}
    if chat:
        body = "\n\n".join(f"[[ ## {name} ## ]]\n{_chat_value(value)}" for name, value in rendered.items())
        return RenderedAnswer(f"{body}\n\n[[ ## completed ## ]]", question, adapter)
    return RenderedAnswer(json.dumps(rendered), question, adapter)


# --- errors --------------------------------------------------------------------------------------------

_LM15_ERRORS: dict[Fault, Callable[..., Exception]] = {
    Fault.RATE_LIMIT: lm15.RateLimitError,
    Fault.SERVER_ERROR: lm15.ServerError,
    Fault.TIMEOUT: lm15.TimeoutError,
    Fault.TRANSPORT: lm15.TransportError,
    Fault.CONTEXT_WINDOW: lm15.ContextLengthError,
    Fault.AUTH: lm15.AuthError,
    Fault.INVALID_JSON: lm15.ProviderError,
}
# --- the LM --------------------------------------------------------------------------------------------


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
        prompt = "".join(m.text or "" for m in request.messages) + _system_text(request)
        input_tokens, output_tokens = _tokens(prompt), _tokens(answer.text)
        usage = lm15.Usage(
            input_tokens=input_tokens, output_tokens=output_tokens, total_tokens=input_tokens + output_tokens
        )
        self.record(request, step, input_tokens, output_tokens, answer)
        return lm15.Response(
            id=f"fault-{len(self.journal)}",
            model=self.model,
            message=lm15.Message.assistant([lm15.TextPart(answer.text)]),
            finish_reason="stop",
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
            )
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
        for event in lm15.response_to_events(response):
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
        return iter(lm15.response_to_events(self.complete(request)))

    def close(self) -> None:
        return None


class FaultInjectingLM(dspy.LM):  # type: ignore[misc]
    """A ``dspy.LM`` that answers locally and injects faults; ``journal`` records every request.

    ``num_retries`` defaults to 0 and DSPy's response cache to off, as an LM under a pipeline should be.
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
        **kwargs: Any,
    ) -> None:
        steps = parse_steps(script, "FaultInjectingLM.script")
        if not isinstance(profile, FaultProfile):
            profile = build_options(FaultProfile, "FaultProfile", dict(profile or {}))
        self.core = _FaultCore(model, profile, steps, seed, answers, clock or LoopClock())
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
