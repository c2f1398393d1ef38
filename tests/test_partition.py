"""Partitions: per-key state created on first use, LRU order, idle states evicted, busy and current ones kept."""

from __future__ import annotations

from collections.abc import Hashable

from resilient_dspy.partition import Partitions


class State:
    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.busy = False

    def idle(self, now: float) -> bool:
        return not self.busy


def test_the_same_key_returns_the_same_state() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=10, idle_after=60)
    assert parts.get("a", 0) is parts.get("a", 1)
    assert len(parts) == 1 and "a" in parts


def test_beyond_max_keys_the_least_recently_used_idle_state_goes() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=2, idle_after=60)
    parts.get("a", 0)
    parts.get("b", 1)
    parts.get("a", 2)
    parts.get("c", 3)
    assert sorted(k for k, _ in parts.items()) == ["a", "c"]  # type: ignore[type-var]


def test_busy_states_are_never_evicted() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=1, idle_after=60)
    parts.get("a", 0).busy = True
    parts.get("b", 1).busy = True
    parts.get("c", 2)
    assert {"a", "b"} <= {k for k, _ in parts.items()}


def test_the_state_being_handed_out_is_never_evicted_even_when_everything_ahead_is_busy() -> None:
    """Regression: a new (idle-looking) state behind busy ones was dropped by the sweep of its own get()."""
    parts: Partitions[State] = Partitions(State, max_keys=2, idle_after=60)
    parts.get("a", 0).busy = True
    parts.get("b", 0).busy = True
    fresh = parts.get("c", 0)
    assert parts.peek("c") is fresh
    assert parts.get("c", 1) is fresh


def test_idle_states_unused_for_idle_after_are_evicted() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=100, idle_after=10)
    parts.get("old", 0)
    parts.get("new", 5)
    parts.get("new", 11)
    assert parts.peek("old") is None and parts.peek("new") is not None
