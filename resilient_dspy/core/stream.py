"""Streaming through the layers: what reached the consumer decides what may still happen to a call.

``dspy.streamify(pipeline.as_module(), ...)`` gives DSPy a stream (``dspy.settings.send_stream``) that the LM sends its
chunks to. A streamed call of a :class:`~resilient_dspy.core.dspy_module.ResilientModule` puts a :class:`StreamRelay`
in its place for the length of the call: the relay hands each chunk on to the consumer's stream (on the consumer's
own event loop when the call runs on the pipeline's background loop) and counts the chunks that reached it.

The rules, read by the layers through :func:`stream_started`:

- a retry or a fallback happens only while no chunk has reached the consumer; after the first, a failure ends the
  stream with :class:`~resilient_dspy.errors.StreamInterruptedError` (its ``__cause__`` the failure): a second answer
  would repeat or mix chunks;
- a ``Timeout`` with ``first_chunk=`` / ``idle=`` bounds the wait for the first chunk and each pause between chunks
  (:class:`ChunkLimits`); time spent handing a chunk to a slow consumer is not a pause of the LM;
- a cache hit or a static fallback answer sends no chunk: the consumer gets the final prediction;
- a layer that holds capacity (bulkhead permit, limiter admission) holds it while ``await next(call)`` runs, and the
  chunks are sent during that await: the whole stream.

Chunks sent by a worker thread a timeout abandoned (a sync ``forward()``), or after the call ended, are refused, so
they never reach the consumer. Status messages (``dspy.streaming.StatusMessage``) pass through and are not counted.
See docs/concepts/dspy-integration.md (a diagram).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import anyio.from_thread
import dspy
from dspy.streaming.messages import StatusMessage

from resilient_dspy.binding.settings import setting
from resilient_dspy.binding.threads import current_thread_run
from resilient_dspy.errors import StreamInterruptedError

if TYPE_CHECKING:
    from resilient_dspy.core.clock import Clock, DeadlineScope
    from resilient_dspy.core.pipeline import Pipeline

__all__ = ["ChunkLimits", "StreamClosedError", "StreamRelay", "consumer_loop", "run_streamed", "stream_started"]


class StreamClosedError(RuntimeError):
    """A chunk sent after its call ended, or by a worker thread its caller abandoned: it is not delivered."""


class StreamRelay:
    """Stands in for the consumer's stream during one streamed call: forwards, counts, and tells the limits."""

    def __init__(self, consumer: Any, loop: asyncio.AbstractEventLoop) -> None:
        self.consumer = consumer
        self.loop = loop
        self.delivered = 0
        """Chunks of the model that reached the consumer's stream."""
        self.closed = False
        self.limits: list[ChunkLimits] = []

    async def send(self, item: Any) -> None:
        """What the LM calls for each chunk (as on anyio's ``MemoryObjectSendStream``)."""
        run = current_thread_run()
        if self.closed or (run is not None and run.abandoned):
            raise StreamClosedError("the call this chunk belongs to has ended; it is not delivered")
        if isinstance(item, StatusMessage):
            await self._deliver(item)
            return
        for limit in self.limits:
            limit.arrived()
        await self._deliver(item)
        self.delivered += 1
        for limit in self.limits:
            limit.delivered()

    async def _deliver(self, item: Any) -> None:
        if asyncio.get_running_loop() is self.loop:
            await self.consumer.send(item)
            return
        future = asyncio.run_coroutine_threadsafe(self.consumer.send(item), self.loop)
        try:
            await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            if _succeeded(future) and not isinstance(item, StatusMessage):
                self.delivered += 1  # it reached the consumer just before the cancellation
            raise

    def close(self) -> None:
        self.closed = True


def _succeeded(future: concurrent.futures.Future[Any]) -> bool:
    return future.done() and not future.cancelled() and future.exception() is None


def current_relay() -> StreamRelay | None:
    """The relay of the streamed call running in this context, or None."""
    stream = setting("send_stream")
    return stream if isinstance(stream, StreamRelay) else None


def stream_started() -> bool:
    """True when a chunk of the streamed call running in this context reached its consumer: from then on no layer
    may run the call again (a retry, a fallback)."""
    relay = current_relay()
    return relay is not None and relay.delivered > 0


class ChunkLimits:
    """A Timeout's ``first_chunk`` and ``idle`` limits over a streamed call, by moving its deadline scope.

    Until the first chunk arrives the deadline is ``start + first_chunk``; while a chunk is handed to the consumer
    it is the total deadline only; after each delivery it is ``now + idle``; never later than the total deadline.
    """

    def __init__(
        self,
        relay: StreamRelay,
        scope: DeadlineScope,
        deadline: float,
        clock: Clock,
        first_chunk: float | None,
        idle: float | None,
    ) -> None:
        reschedule = getattr(scope, "reschedule", None)
        if reschedule is None:
            raise TypeError(f"first_chunk= and idle= need a deadline scope with reschedule() (got {scope!r})")
        self._reschedule: Callable[[float | None], None] = reschedule
        self._relay = relay
        self._deadline = deadline
        self._clock = clock
        self._first = first_chunk
        self._idle = idle
        self._loop = asyncio.get_running_loop()
        self.waiting: tuple[str, float] | None = None
        """The limit in force: ``("first_chunk" | "idle", seconds)``, or None while only the deadline is."""

    @classmethod
    def over(
        cls, scope: DeadlineScope, deadline: float, clock: Clock, first_chunk: float | None, idle: float | None
    ) -> ChunkLimits | None:
        """The limits for the call running now, or None when it does not stream (they then do nothing)."""
        relay = current_relay()
        return None if relay is None else cls(relay, scope, deadline, clock, first_chunk, idle)

    def __enter__(self) -> ChunkLimits:
        self._relay.limits.append(self)
        if self._first is not None and self._relay.delivered == 0:
            self._limit("first_chunk", self._first)
        return self

    def __exit__(self, *exc: object) -> None:
        self._relay.limits.remove(self)

    def arrived(self) -> None:
        self._on_loop(self._lift)

    def delivered(self) -> None:
        idle = self._idle
        if idle is not None:
            self._on_loop(lambda: self._limit("idle", idle))

    def _limit(self, name: str, seconds: float) -> None:
        when = self._clock.now() + seconds
        if when < self._deadline:
            self.waiting = (name, seconds)
            self._reschedule(when)
        else:
            self._lift()

    def _lift(self) -> None:
        self.waiting = None
        self._reschedule(self._deadline)

    def _on_loop(self, action: Callable[[], None]) -> None:
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        if here is self._loop:
            action()
        else:
            self._loop.call_soon_threadsafe(action)


def consumer_loop() -> asyncio.AbstractEventLoop:
    """The event loop of the consumer's stream, for a sync call made from the worker thread ``dspy.streamify`` runs
    a sync program in (an anyio worker thread of that loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        pass
    else:
        raise RuntimeError(
            "a sync call made on a running event loop cannot stream (it would block the loop the consumer reads "
            "on): use dspy.streamify(module, is_async_program=True), or await module.acall(...)"
        )
    try:
        return anyio.from_thread.run_sync(asyncio.get_running_loop)
    except RuntimeError as error:
        raise RuntimeError(
            "dspy.settings.send_stream is set, but this thread belongs to no event loop the stream could be read "
            "on: stream a module with dspy.streamify(module, ...)"
        ) from error


async def run_streamed(
    pipeline: Pipeline, args: tuple[Any, ...], kwargs: dict[str, Any], consumer: Any, loop: asyncio.AbstractEventLoop
) -> Any:
    """``await pipeline(*args, **kwargs)`` with its chunks relayed to ``consumer`` (a stream read on ``loop``)."""
    relay = StreamRelay(consumer, loop)
    try:
        with dspy.context(send_stream=relay):
            return await pipeline(*args, **kwargs)
    except Exception as error:
        if relay.delivered and not isinstance(error, StreamInterruptedError):
            raise StreamInterruptedError(relay.delivered, error) from error
        raise
    finally:
        relay.close()
