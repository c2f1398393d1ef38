"""Single-flight across processes (docs/patterns/cache.md, "Sharing a cache between processes").

On a leasing backend (:class:`~resilient_dspy.middleware.cache.backends.redis_backend.RedisBackend`) the call that
leads a key in its process asks the store once: the entry, or a lease on the key (``SET NX PX``), or "another
process holds it". A waiter then polls on a computed schedule — a quarter of the time the leader has held the
lease so far, between :data:`MIN_POLL` and :data:`MAX_POLL`, never past the lease's expiry — until the entry is
there (served as a coalesced answer), the lease is free (it takes it: a crashed leader's lease expires and one
waiter takes over), or it reached ``max_wait`` or its deadline (it runs the call itself, without a lease). Polling
rather than pub/sub: it needs nothing but the store's bounded ``run`` step (no subscriber connection, no reader
task to leak, no message lost between a check and a subscribe), costs each waiting process a few steps per second,
and adds at most a quarter of the leader's time (at most ``MAX_POLL``) to a follower's answer.

While it waits, the call lends its bulkhead slot (as an in-process follower does), and takes it back before it
runs the call. Every step fails open: a store that fails or runs out of the read share makes the call a plain miss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from resilient_dspy.core.call import lend_leases, reclaim_leases

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.middleware.cache.backend_calls import BackendCalls

__all__ = ["MAX_POLL", "MIN_POLL", "POLL_SHARE", "Settled", "settle"]

MIN_POLL = 0.005
"""Seconds between two looks at least."""
MAX_POLL = 0.1
"""Seconds between two looks at most: the most a follower's answer comes late."""
POLL_SHARE = 0.25
"""The next look comes after this share of the time the leader has held its lease."""


@dataclass(frozen=True, slots=True)
class Settled:
    """How a lookup ended: the entry's ``data``; or run the call (holding ``lease`` when it is not None).
    ``waited``: another process led the key for a while (a found entry is then a coalesced answer)."""

    data: bytes | None
    lease: str | None
    waited: bool


async def settle(calls: BackendCalls, call: Call, key: str, lease_ttl: float, max_wait: float) -> Settled:
    """Look ``key`` up on the store and wait for another process's answer as the module says."""
    clock = call.clock
    started = clock.now()
    deadline = call.deadline
    give_up = started + max_wait if deadline is None else min(started + max_wait, deadline)
    waited = False
    while True:
        now = clock.now()
        remaining = lease_ttl if deadline is None else min(lease_ttl, deadline - now + calls.options.backend_timeout)
        claim = await calls.claim(call, key, max(remaining, MIN_POLL))
        if claim is None:  # failed or out of time: a plain miss
            return await _lead(call, Settled(None, None, waited))
        if claim.value is not None or claim.token is not None:
            return await _lead(call, Settled(claim.value, claim.token, waited))
        now = clock.now()
        if now >= give_up:
            return await _lead(call, Settled(None, None, True))
        pause = min(max(claim.held_for * POLL_SHARE, MIN_POLL), MAX_POLL, claim.lease_left + MIN_POLL)
        if not waited and call.record.leases:
            lend_leases(call)  # it only waits: its bulkhead slot serves other questions meanwhile
        waited = True
        await clock.sleep(min(pause, give_up - now))


async def _lead(call: Call, settled: Settled) -> Settled:
    """Take back the slot lent while waiting before the call works (serving an entry needs none)."""
    if settled.waited and settled.data is None and call.record.leases:
        await reclaim_leases(call)
    return settled
