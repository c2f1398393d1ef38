"""The chaos server: a local OpenAI-compatible chat-completions endpoint that answers DSPy prompts or fails on purpose.

Point a real ``dspy.LM("openai/<id>", api_base=server.api_base, ...)`` at it to test a pipeline over real HTTP.
Answers follow DSPy's Chat format (``[[ ## field ## ]]`` sections) or JSON (when ``response_format`` or the prompt
asks for it) and report ``usage``. Faults use the same vocabulary as :class:`FaultInjectingLM`: 429 with
``Retry-After``, 5xx, 504, dropped connections, hangs (until the client gives up, at most ``max_hang``), replies
that are not JSON, answers without markers, 400 ``context_length_exceeded`` and 401; quotas on requests and tokens
per window answer 429 with the time until they free up. Faults come from an exact script first, then a seeded
profile; ``/control/*`` endpoints (and the same methods in-process) change them while it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import dspy
from aiohttp import web
from pydantic import Field

from resilient_dspy.core.options import Options, build_options
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.faults import MALFORMED_TEXT, Fault, FaultStep, ScriptEntry, parse_steps
from resilient_dspy.testing.fault_lm import (
    Answers,
    Drawn,
    FaultProfile,
    FaultSchedule,
    JournalEntry,
    RenderedAnswer,
    render_answer,
)

__all__ = ["ChaosServer", "Quota", "is_loopback"]


class Quota(Options):
    """Provider-style quotas over a sliding ``window`` (a minute by default; shorten it in tests)."""

    requests_per_minute: int | None = Field(default=None, ge=1, description="Admitted requests per window.")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="Prompt + completion tokens per window.")
    window: float = Field(default=60.0, gt=0, allow_inf_nan=False, description="The window, in seconds.")


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1): the only hosts served by default."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _tokens(text: str) -> int:
    return max(1, len(text) // 4)


def _seconds(value: float) -> str:
    """Seconds for a Retry-After header: rounded up to the millisecond, without trailing zeros."""
    text = f"{math.ceil(round(value * 1000, 6)) / 1000:.3f}".rstrip("0").rstrip(".")
    return text or "0"


def _text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def _error(status: int, message: str, kind: str, code: str | None = None, **headers: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return web.json_response(body, status=status, headers=headers or None)


class _QuotaWindow:
    """The admitted requests of the last window, each with its tokens, to answer "must this one wait, how long?"."""

    def __init__(self, quota: Quota) -> None:
        self.quota = quota
        self.log: deque[list[float]] = deque()

    def wait(self, now: float, tokens: int) -> tuple[float, str] | None:
        quota, log = self.quota, self.log
        while log and log[0][0] <= now - quota.window:
            log.popleft()
        rpm, tpm = quota.requests_per_minute, quota.tokens_per_minute
        if rpm is not None and len(log) >= rpm:
            return log[len(log) - rpm][0] + quota.window - now, "requests_per_minute"
        if tpm is not None:
            used = sum(entry[1] for entry in log)
            if used + tokens > tpm:
                if tokens > tpm:
                    return quota.window, "tokens_per_minute"
                for when, spent in log:
                    used -= spent
                    if used + tokens <= tpm:
                        return when + quota.window - now, "tokens_per_minute"
        return None

    def admit(self, now: float, tokens: int) -> list[float]:
        entry = [now, float(tokens)]
        self.log.append(entry)
        return entry


class ChaosServer:
    """An OpenAI-compatible chaos endpoint on ``aiohttp.web``: ``async with ChaosServer() as server: server.url``."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        profile: FaultProfile | Mapping[str, Any] | None = None,
        script: Iterable[ScriptEntry] = (),
        seed: int | None = 0,
        quota: Quota | Mapping[str, Any] | None = None,
        answers: Answers | None = None,
        max_hang: float = 30.0,
        allow_remote: bool = False,
    ) -> None:
        problems: list[tuple[str, str]] = []
        if not allow_remote and not is_loopback(host):
            problems.append(("ChaosServer.host", f"{host!r} is not a loopback address; pass allow_remote=True"))
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            problems.append(("ChaosServer.port", f"must be an int from 0 (ephemeral) to 65535 (got {port!r})"))
        if isinstance(max_hang, bool) or not isinstance(max_hang, int | float) or not 0 < max_hang < math.inf:
            problems.append(("ChaosServer.max_hang", f"must be a finite number of seconds > 0 (got {max_hang!r})"))
        steps: list[FaultStep] = []
        try:
            steps = parse_steps(script, "ChaosServer.script")
        except ConfigurationError as error:
            problems.extend(error.problems)
        checked_profile, checked_quota = FaultProfile(), None
        try:
            checked_profile = self._profile(profile)
        except ConfigurationError as error:
            problems.extend(error.problems)
        try:
            checked_quota = self._quota(quota)
        except ConfigurationError as error:
            problems.extend(error.problems)
        if problems:
            raise ConfigurationError(problems)
        self.host = host
        self.port = port
        self.seed = seed
        self.answers = answers
        self.max_hang = float(max_hang)
        self.schedule = FaultSchedule(checked_profile, steps, seed)
        self.journal: list[JournalEntry] = []
        self._window = _QuotaWindow(checked_quota) if checked_quota is not None else None
        self._runner: web.AppRunner | None = None
        self._closing: asyncio.Event | None = None
        self._bound_port: int | None = None
        self.in_flight = 0

    @staticmethod
    def _profile(profile: FaultProfile | Mapping[str, Any] | None) -> FaultProfile:
        if isinstance(profile, FaultProfile):
            return profile
        return build_options(FaultProfile, "FaultProfile", dict(profile or {}))

    @staticmethod
    def _quota(quota: Quota | Mapping[str, Any] | None) -> Quota | None:
        if quota is None or isinstance(quota, Quota):
            return quota
        return build_options(Quota, "Quota", dict(quota))

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self) -> ChaosServer:
        """Bind and serve; with ``port=0`` the OS picks a free port (see :attr:`url`)."""
        if self._runner is not None:
            raise RuntimeError("the chaos server is already running")
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._complete)
        app.router.add_post("/chat/completions", self._complete)
        app.router.add_get("/health", self._health)
        app.router.add_get("/control/faults", self._control_state)
        app.router.add_post("/control/faults", self._control_faults)
        app.router.add_post("/control/reset", self._control_reset)
        app.router.add_get("/control/journal", self._control_journal)
        runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=1.0)
        await runner.setup()
        self._closing = asyncio.Event()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._bound_port = int(runner.addresses[0][1])
        return self

    async def close(self) -> None:
        """Stop serving: pending delays and hangs end by dropping their connection, then every handler is done."""
        runner, self._runner = self._runner, None
        if runner is None:
            return
        if self._closing is not None:
            self._closing.set()
        await runner.cleanup()

    async def __aenter__(self) -> ChaosServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def url(self) -> str:
        """``http://host:port`` of the running server."""
        if self._bound_port is None:
            raise RuntimeError("the chaos server is not running; use 'async with ChaosServer() as server'")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self._bound_port}"

    @property
    def api_base(self) -> str:
        """The OpenAI base URL to give a client: ``url + "/v1"``."""
        return f"{self.url}/v1"

    def lm(self, model: str = "chaos", **kwargs: Any) -> dspy.LM:
        """A real ``dspy.LM`` for this server (OpenAI chat completions, DSPy's cache and retries off)."""
        settings: dict[str, Any] = {"api_key": "chaos", "cache": False, "num_retries": 0, **kwargs}
        return dspy.LM(f"openai/{model}", api_base=self.api_base, **settings)

    # --- control ---------------------------------------------------------------------------------------

    @property
    def requests(self) -> int:
        """How many chat-completion requests reached the server (answered or not)."""
        return len(self.journal)

    @property
    def pending(self) -> tuple[FaultStep, ...]:
        return tuple(self.schedule.script)

    def script(self, *steps: ScriptEntry) -> None:
        """Replace the scripted steps: the next requests get exactly these, then the profile decides."""
        self.schedule.replace(parse_steps(steps, "ChaosServer.script"))

    def push(self, *steps: ScriptEntry) -> None:
        """Append scripted steps after the ones pending."""
        self.schedule.push(parse_steps(steps, "ChaosServer.push"))

    def set_profile(self, profile: FaultProfile | Mapping[str, Any] | None) -> None:
        """Replace the random profile (None = no faults, no latency)."""
        self.schedule.profile = self._profile(profile)

    def set_quota(self, quota: Quota | Mapping[str, Any] | None) -> None:
        """Replace the quotas (None = unlimited); the window starts empty."""
        checked = self._quota(quota)
        self._window = _QuotaWindow(checked) if checked is not None else None

    def reset(self) -> None:
        """Back to a fault-free server with no quota and an empty journal (the random source is re-seeded)."""
        self.schedule = FaultSchedule(FaultProfile(), (), self.seed)
        self._window = None
        self.journal.clear()

    # --- HTTP handlers ---------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok", "pending": len(self.schedule.script), "requests": self.requests})

    async def _control_faults(self, request: web.Request) -> web.Response:
        """Validate every setting in the body first, then apply them all (or none, with a 400 listing problems)."""
        try:
            body = await request.json()
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object", "invalid_request_error")
        problems: list[tuple[str, str]] = []
        unknown = sorted(set(body) - {"script", "push", "profile", "quota"})
        if unknown:
            problems.append(("body", f"unknown key(s) {unknown}; known: script, push, profile, quota"))
        steps: dict[str, list[FaultStep]] = {}
        for key in ("script", "push"):
            if key not in body:
                continue
            if not isinstance(body[key], list):
                problems.append((key, f"must be a list of steps (got {body[key]!r})"))
                continue
            try:
                steps[key] = parse_steps(body[key], key)
            except ConfigurationError as error:
                problems.extend(error.problems)
        profile: FaultProfile | None = None
        quota: Quota | None = None
        for key in ("profile", "quota"):
            value = body.get(key)
            if key in body and value is not None and not isinstance(value, dict):
                problems.append((key, f"must be a JSON object or null (got {value!r})"))
                continue
            try:
                if key == "profile" and key in body:
                    profile = self._profile(value)
                elif key == "quota" and key in body:
                    quota = self._quota(value)
            except ConfigurationError as error:
                problems.extend(error.problems)
        if problems:
            error_body = {"message": "invalid fault settings", "type": "invalid_request_error", "problems": problems}
            return web.json_response({"error": error_body}, status=400)
        if "script" in steps:
            self.schedule.replace(steps["script"])
        if "push" in steps:
            self.schedule.push(steps["push"])
        if profile is not None:
            self.schedule.profile = profile
        if "quota" in body:
            self.set_quota(quota)
        return web.json_response(self._state())

    async def _control_state(self, request: web.Request) -> web.Response:
        return web.json_response(self._state())

    async def _control_reset(self, request: web.Request) -> web.Response:
        self.reset()
        return web.json_response(self._state())

    async def _control_journal(self, request: web.Request) -> web.Response:
        return web.json_response({"entries": [dataclasses.asdict(entry) for entry in self.journal]})

    def _state(self) -> dict[str, Any]:
        """The fault settings in the shape ``POST /control/faults`` takes, so they can be saved and posted back."""
        window = self._window
        return {
            "script": [dataclasses.asdict(step) for step in self.schedule.script],
            "profile": self.schedule.profile.model_dump(mode="json"),
            "quota": window.quota.model_dump(mode="json") if window is not None else None,
        }

    async def _pause(self, seconds: float) -> bool:
        """Wait ``seconds``, cut short when the server closes; True when it is closing."""
        closing = self._closing
        if closing is None or closing.is_set():
            return True
        try:
            async with asyncio.timeout(seconds):
                await closing.wait()
        except TimeoutError:
            return False
        return True

    def _record(
        self,
        model: str,
        drawn: Drawn,
        question: str,
        *,
        status: int | None,
        detail: str = "",
        answer: RenderedAnswer | None = None,
        tokens: tuple[int, int] = (0, 0),
    ) -> int:
        """Journal one request (``status`` is the HTTP status sent, None when none was); returns its index."""
        self.journal.append(
            JournalEntry(
                asyncio.get_running_loop().time(),
                model,
                drawn.fault,
                question,
                tokens[0],
                tokens[1],
                latency=drawn.latency,
                status=status,
                retry_after=drawn.retry_after,
                adapter=answer.adapter if answer is not None else None,
                detail=detail,
            )
        )
        return len(self.journal) - 1

    @staticmethod
    def _drop(request: web.Request) -> web.Response:
        transport = request.transport
        if transport is not None:
            transport.close()
        return web.Response(status=204)

    async def _complete(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not JSON", "invalid_request_error")
        messages = body.get("messages") if isinstance(body, dict) else None
        if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
            return _error(400, "'messages' must be a non-empty list of messages", "invalid_request_error")
        if body.get("stream"):
            return _error(400, "streaming is not supported by the chaos server", "invalid_request_error")
        self.in_flight += 1
        try:
            return await self._answer(request, body, messages)
        finally:
            self.in_flight -= 1

    async def _answer(self, request: web.Request, body: dict[str, Any], messages: list[dict[str, Any]]) -> web.Response:
        model = str(body.get("model", "chaos"))
        system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
        user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        prompt_tokens = _tokens("".join(_text(m.get("content")) for m in messages))
        response_format = body.get("response_format")
        schema, json_mode = None, None
        if isinstance(response_format, dict) and response_format.get("type") in ("json_object", "json_schema"):
            json_mode = True
            wrapper = response_format.get("json_schema")
            if isinstance(wrapper, dict) and isinstance(wrapper.get("schema"), dict):
                schema = wrapper["schema"]
        rendered = render_answer(system, user, answers=self.answers, schema=schema, json_mode=json_mode)
        now = asyncio.get_running_loop().time()

        window = self._window
        wait = window.wait(now, prompt_tokens) if window is not None else None
        if wait is not None:
            seconds, which = wait
            over = Drawn(Fault.RATE_LIMIT, retry_after=seconds, status=429)
            self._record(model, over, rendered.question, status=429, detail=f"{which} quota")
            message = f"Rate limit reached: {which} quota of the chaos server"
            return _error(429, message, "requests", "rate_limit_exceeded", **self._retry_after(seconds))
        admitted = window.admit(now, prompt_tokens) if window is not None else None

        drawn = self.schedule.draw()
        if drawn.latency:
            started = asyncio.get_running_loop().time()
            try:
                closing = await self._pause(drawn.latency)
            except asyncio.CancelledError:
                waited = asyncio.get_running_loop().time() - started
                detail = f"client gave up during the delay after {waited:.3f}s"
                self._record(model, drawn, rendered.question, status=None, detail=detail)
                raise
            if closing:
                detail = "server closing; connection dropped"
                self._record(model, drawn, rendered.question, status=None, detail=detail)
                return self._drop(request)
        fault = drawn.fault
        if fault is Fault.HANG:
            return await self._hang(request, model, drawn, rendered.question)
        if fault is Fault.TRANSPORT:
            self._record(model, drawn, rendered.question, status=None, detail="connection dropped")
            return self._drop(request)
        if fault is Fault.OK or fault is Fault.MALFORMED:
            return self._completion(model, drawn, rendered, prompt_tokens, admitted)
        self._record(model, drawn, rendered.question, status=drawn.status)
        if fault is Fault.RATE_LIMIT:
            headers = self._retry_after(drawn.retry_after) if drawn.retry_after is not None else {}
            return _error(429, "Rate limit reached (injected)", "requests", "rate_limit_exceeded", **headers)
        if fault is Fault.INVALID_JSON:
            return web.Response(text='{"id": "chatcmpl-chaos", "choices": [', content_type="application/json")
        if fault is Fault.CONTEXT_WINDOW:
            message = f"This model's maximum context length is 128 tokens. Your messages resulted in {prompt_tokens}."
            return _error(400, message, "invalid_request_error", "context_length_exceeded")
        if fault is Fault.AUTH:
            return _error(401, "Incorrect API key provided (injected)", "invalid_request_error", "invalid_api_key")
        status = drawn.status or 503
        kind = "timeout" if fault is Fault.TIMEOUT else "server_error"
        return _error(status, f"injected {fault.value} ({status})", kind)

    @staticmethod
    def _retry_after(seconds: float) -> dict[str, str]:
        return {"Retry-After": _seconds(seconds), "retry-after-ms": str(math.ceil(round(seconds * 1000, 6)))}

    async def _hang(self, request: web.Request, model: str, drawn: Drawn, question: str) -> web.Response:
        """Say nothing until the client gives up (aiohttp cancels this handler), the server closes, or max_hang."""
        index = self._record(model, drawn, question, status=None, detail="hanging")
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            closing = await self._pause(self.max_hang)
        except asyncio.CancelledError:
            self.journal[index] = dataclasses.replace(
                self.journal[index], detail=f"client gave up after {loop.time() - started:.3f}s"
            )
            raise
        reason = "server closing" if closing else f"max_hang of {self.max_hang:g}s reached"
        self.journal[index] = dataclasses.replace(self.journal[index], detail=f"{reason}; connection dropped")
        return self._drop(request)

    def _completion(
        self, model: str, drawn: Drawn, rendered: RenderedAnswer, prompt_tokens: int, admitted: list[float] | None
    ) -> web.Response:
        text = MALFORMED_TEXT if drawn.fault is Fault.MALFORMED else rendered.text
        completion_tokens = _tokens(text)
        if admitted is not None:
            admitted[1] += completion_tokens
        self._record(
            model, drawn, rendered.question, status=200, answer=rendered, tokens=(prompt_tokens, completion_tokens)
        )
        return web.json_response(
            {
                "id": f"chatcmpl-chaos-{len(self.journal)}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )
