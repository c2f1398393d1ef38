"""What the chaos server does with one ``POST /chat/completions``: the quota first, then the drawn fault (a delay, a
hang, a dropped connection, an error status) or an answer in the adapter's format (streamed when asked, with the
next stream fault: :mod:`.streaming`), each journaled."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections import deque
from typing import Any

from aiohttp import web

from resilient_dspy.faults import MALFORMED_TEXT, Fault, truncate_answer
from resilient_dspy.testing.chaos_server.settings import _QuotaWindow
from resilient_dspy.testing.chaos_server.streaming import StreamStep, stream_answer
from resilient_dspy.testing.fault_lm.answers import Answers, RenderedAnswer, count_tokens, render_answer
from resilient_dspy.testing.fault_lm.schedule import Drawn, FaultSchedule, JournalEntry

__all__: list[str] = []


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


class _Completions:
    """The chat-completions handler of :class:`~resilient_dspy.testing.chaos_server.ChaosServer` (a base of it): the
    state it reads is the server's, set by the server."""

    schedule: FaultSchedule
    stream_script: deque[StreamStep]
    journal: list[JournalEntry]
    answers: Answers | None
    max_hang: float
    in_flight: int
    _window: _QuotaWindow | None
    _closing: asyncio.Event | None

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
        self.in_flight += 1
        try:
            return await self._answer(request, body, messages)
        finally:
            self.in_flight -= 1

    async def _answer(
        self, request: web.Request, body: dict[str, Any], messages: list[dict[str, Any]]
    ) -> web.StreamResponse:
        model = str(body.get("model", "chaos"))
        system = "\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
        user = next((_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
        prompt_tokens = count_tokens("".join(_text(m.get("content")) for m in messages))
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
        answers = fault is Fault.OK or fault is Fault.MALFORMED or fault is Fault.TRUNCATED
        if answers and body.get("stream"):
            return await self._streamed(request, body, model, drawn, rendered, prompt_tokens, admitted)
        if answers:
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

    async def _streamed(
        self,
        request: web.Request,
        body: dict[str, Any],
        model: str,
        drawn: Drawn,
        rendered: RenderedAnswer,
        prompt_tokens: int,
        admitted: list[float] | None,
    ) -> web.StreamResponse:
        """The answer as server-sent events, with the next scripted stream fault (see :mod:`.streaming`)."""
        text = _answer_text(drawn.fault, rendered.text)
        completion_tokens = count_tokens(text)
        if admitted is not None:
            admitted[1] += completion_tokens
        step = self.stream_script.popleft() if self.stream_script else StreamStep()
        options = body.get("stream_options")
        wants_usage = isinstance(options, dict) and options.get("include_usage") is True
        tokens = (prompt_tokens, completion_tokens)
        usage = {"prompt_tokens": tokens[0], "completion_tokens": tokens[1], "total_tokens": sum(tokens)}
        index = self._record(model, drawn, rendered.question, status=200, answer=rendered, tokens=tokens)
        response, detail = await stream_answer(
            request,
            self,
            ident=f"chatcmpl-chaos-{index + 1}",
            model=model,
            text=text,
            usage=usage if wants_usage else None,
            step=step,
        )
        self.journal[index] = dataclasses.replace(self.journal[index], detail=detail)
        return response

    def _completion(
        self, model: str, drawn: Drawn, rendered: RenderedAnswer, prompt_tokens: int, admitted: list[float] | None
    ) -> web.Response:
        text = _answer_text(drawn.fault, rendered.text)
        completion_tokens = count_tokens(text)
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
                        "finish_reason": "length" if drawn.fault is Fault.TRUNCATED else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": prompt_tokens,
                    "completion_tokens": completion_tokens,
                    "total_tokens": prompt_tokens + completion_tokens,
                },
            }
        )


def _answer_text(fault: Fault, text: str) -> str:
    """What a 200 carries for ``fault``: the answer, the malformed text, or the answer cut at its token limit."""
    if fault is Fault.MALFORMED:
        return MALFORMED_TEXT
    return truncate_answer(text) if fault is Fault.TRUNCATED else text
