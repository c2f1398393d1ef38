"""A streamed answer of the chaos server (``"stream": true``): OpenAI's server-sent events, one word per chunk, and the
faults a stream can have, after a given number of chunks.

A :class:`StreamStep` says what the next streamed answer does (an exact script, consumed in order; once it is empty
answers stream whole): ``disconnect`` drops the connection after ``after`` chunks (DSPy: ``LMTransportError``);
``stall`` pauses ``seconds`` after ``after`` chunks (None: until the client gives up or the server closes, at most
``max_hang``) and then goes on; ``truncate`` ends the response cleanly after ``after`` chunks, without the final
chunk or ``data: [DONE]`` (``LMStreamAssemblyError``); ``malformed_chunk`` sends an event whose data is not JSON
after ``after`` chunks (``LMUnexpectedError``). The request's ordinary fault (a 429, a 5xx, a delay...) is drawn
first, as for any request: it comes before the stream starts.
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from aiohttp import web

from resilient_dspy.errors import ConfigurationError

__all__ = ["StreamFault", "StreamStep", "parse_stream_steps", "sse_chunks", "stream_answer"]


class StreamFault(StrEnum):
    """What a streamed answer does after ``after`` chunks."""

    OK = "ok"
    DISCONNECT = "disconnect"
    STALL = "stall"
    TRUNCATE = "truncate"
    MALFORMED_CHUNK = "malformed_chunk"


@dataclass(frozen=True, slots=True)
class StreamStep:
    """One streamed answer: its fault, after how many chunks, and for a stall how long (None: until given up)."""

    fault: StreamFault = StreamFault.OK
    after: int = 1
    seconds: float | None = None

    def __post_init__(self) -> None:
        problems = _problems(self.fault, self.after, self.seconds)
        if problems:
            raise ConfigurationError([(f"StreamStep.{name}", rule) for name, rule in problems])
        object.__setattr__(self, "fault", StreamFault(self.fault))


def _problems(fault: Any, after: Any, seconds: Any) -> list[tuple[str, str]]:
    problems = []
    if fault not in [kind.value for kind in StreamFault]:
        problems.append(("fault", f"unknown stream fault {fault!r}; known: {', '.join(k.value for k in StreamFault)}"))
    if isinstance(after, bool) or not isinstance(after, int) or after < 0:
        problems.append(("after", f"must be a number of chunks >= 0 (got {after!r})"))
    if seconds is not None and (
        isinstance(seconds, bool) or not isinstance(seconds, int | float) or not math.isfinite(seconds) or seconds < 0
    ):
        problems.append(("seconds", f"must be a finite number of seconds >= 0, or None (got {seconds!r})"))
    if seconds is not None and fault != StreamFault.STALL:
        problems.append(("seconds", f"only a stall takes seconds (fault is {fault})"))
    return problems


def parse_stream_steps(entries: Iterable[StreamStep | str | Mapping[str, Any] | None], field: str) -> list[StreamStep]:
    """Stream steps from steps, fault names, None (ok) or mappings of the fields; every problem reported at once."""
    steps: list[StreamStep] = []
    problems: list[tuple[str, str]] = []
    for index, entry in enumerate(entries):
        if isinstance(entry, StreamStep):
            steps.append(entry)
            continue
        values: dict[str, Any] = {} if entry is None else {"fault": entry} if isinstance(entry, str) else dict(entry)
        extra = sorted(set(values) - {"fault", "after", "seconds"})
        if extra:
            problems.append((f"{field}[{index}]", f"unknown key(s) {extra}; known: fault, after, seconds"))
            continue
        fault, after, seconds = values.get("fault") or "ok", values.get("after", 1), values.get("seconds")
        found = _problems(fault, after, seconds)
        if found:
            problems.extend((f"{field}[{index}].{name}", rule) for name, rule in found)
            continue
        steps.append(StreamStep(StreamFault(fault), after, seconds))
    if problems:
        raise ConfigurationError(problems)
    return steps


def sse_chunks(text: str) -> list[str]:
    """``text`` as a provider streams it: one word (with the spaces around it) per chunk."""
    return re.findall(r"\s*\S+\s*|\s+", text) or [text]


def _event(payload: dict[str, Any] | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n".encode()


def _chunk(ident: str, model: str, delta: dict[str, Any], finish: str | None) -> dict[str, Any]:
    return {
        "id": ident,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


async def stream_answer(
    request: web.Request,
    server: Any,
    *,
    ident: str,
    model: str,
    text: str,
    usage: dict[str, int] | None,
    step: StreamStep,
) -> tuple[web.StreamResponse, str]:
    """Send ``text`` as server-sent events with ``step``'s fault; returns the response and what happened (journal)."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await response.prepare(request)
    pieces = sse_chunks(text)
    at = min(step.after, len(pieces)) if step.fault is not StreamFault.OK else -1
    for index in range(len(pieces) + 1):
        if index == at:
            if step.fault is StreamFault.DISCONNECT:
                if request.transport is not None:
                    request.transport.close()
                return response, f"disconnected after {index} chunk(s)"
            if step.fault is StreamFault.TRUNCATE:
                await response.write_eof()
                return response, f"truncated after {index} chunk(s)"
            if step.fault is StreamFault.MALFORMED_CHUNK:
                await response.write(b'data: {"id": "chatcmpl-chaos", "choices": [\n\n')
            elif await server._pause(server.max_hang if step.seconds is None else step.seconds):  # a stall
                if request.transport is not None:
                    request.transport.close()
                return response, f"stalled after {index} chunk(s); server closing"
        if index == len(pieces):
            break
        delta = {"role": "assistant", "content": pieces[index]} if index == 0 else {"content": pieces[index]}
        await response.write(_event(_chunk(ident, model, delta, None)))
    await response.write(_event(_chunk(ident, model, {}, "stop")))
    if usage is not None:
        await response.write(_event({**_chunk(ident, model, {}, None), "choices": [], "usage": usage}))
    await response.write(_event("[DONE]"))
    await response.write_eof()
    detail = f"streamed {len(pieces)} chunk(s)" + ("" if step.fault is StreamFault.OK else f", {step.fault.value}")
    return response, detail
