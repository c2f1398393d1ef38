"""Where stateful layers keep their state: in the process (the default) or on a shared store such as Redis.

``store=None`` on a layer keeps today's in-memory state and speed. A :class:`RedisStore` given to several layers
(and several processes) makes them share one quota, one circuit, one budget and one cache. See
docs/guides/scaling-out.md.
"""

from __future__ import annotations

from resilient_dspy.store.events import StoreRecovered, StoreUnavailable
from resilient_dspy.store.link import StoreLink, StoreOptions
from resilient_dspy.store.protocol import FailMode, StateStore, StoreUnavailableError
from resilient_dspy.store.redis import RedisStore

__all__ = [
    "FailMode",
    "RedisStore",
    "StateStore",
    "StoreLink",
    "StoreOptions",
    "StoreRecovered",
    "StoreUnavailable",
    "StoreUnavailableError",
]
