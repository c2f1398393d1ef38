"""Partitions: per-key state created on first use, LRU order; evicted by what it holds — never with calls, a
protective state only beyond max_keys when nothing harmless is left (counted) — and bounded in memory anyway."""

from __future__ import annotations

from collections.abc import Hashable

from hypothesis import given, settings
from hypothesis import strategies as st

from resilient_dspy.middleware._shared.partitions import Hold, KeyedStates, PartitionOptions, Partitions


class State:
    def __init__(self, key: Hashable) -> None:
        self.key = key
        self.level = Hold.NOTHING

    def hold(self, now: float) -> Hold:
        return self.level


def keys(parts: Partitions[State]) -> set[Hashable]:
    return {k for k, _ in parts.items()}


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
    assert keys(parts) == {"a", "c"}


def test_states_with_calls_are_never_evicted() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=1, idle_after=60)
    parts.get("a", 0).level = Hold.CALLS
    parts.get("b", 1).level = Hold.CALLS
    parts.get("c", 2)
    assert {"a", "b"} <= keys(parts)


def test_the_state_being_handed_out_is_never_evicted_even_when_everything_ahead_is_busy() -> None:
    """Regression: a new (idle-looking) state behind busy ones was dropped by the sweep of its own get()."""
    parts: Partitions[State] = Partitions(State, max_keys=2, idle_after=60)
    parts.get("a", 0).level = Hold.CALLS
    parts.get("b", 0).level = Hold.CALLS
    fresh = parts.get("c", 0)
    assert parts.peek("c") is fresh
    assert parts.get("c", 1) is fresh


def test_idle_states_unused_for_idle_after_are_evicted() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=100, idle_after=10)
    parts.get("old", 0)
    parts.get("new", 5)
    parts.get("new", 11)
    assert parts.peek("old") is None and parts.peek("new") is not None


def test_a_protective_state_outlives_idle_after_and_goes_once_its_protection_expires() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=100, idle_after=10)
    guard = parts.get("guard", 0)
    guard.level = Hold.PROTECTION
    for t in range(1, 50):
        parts.get(f"k{t}", t * 10)
    assert parts.peek("guard") is guard and parts.evicted_protective == 0
    guard.level = Hold.NOTHING
    parts.get("later", 600)
    parts.get("later", 601)
    assert parts.peek("guard") is None and parts.evicted_protective == 0


def test_beyond_max_keys_harmless_states_go_before_protective_ones_then_the_oldest_protective_is_counted() -> None:
    evicted: list[Hashable] = []
    parts: Partitions[State] = Partitions(
        State, max_keys=3, idle_after=600, on_evict=lambda key, state: evicted.append(key)
    )
    parts.get("p1", 0).level = Hold.PROTECTION
    parts.get("p2", 1).level = Hold.PROTECTION
    parts.get("h", 2)
    parts.get("x", 3)  # over by one: h goes, not p1
    assert keys(parts) == {"p1", "p2", "x"} and parts.evicted_protective == 0
    parts.get("x", 4).level = Hold.PROTECTION
    parts.get("y", 5)  # only protective states left: the oldest, p1, goes, and is counted
    assert keys(parts) == {"p2", "x", "y"}
    assert parts.evicted_protective == 1 and parts.last_evicted_at == 5 and evicted == ["p1"]


def test_two_thousand_keys_that_failed_once_stay_bounded_by_max_keys() -> None:
    parts: Partitions[State] = Partitions(State, max_keys=16, idle_after=600)
    for index in range(2000):
        parts.get(index, index).level = Hold.PROTECTION
    assert len(parts) == 16 and parts.evicted_protective == 2000 - 16


# ------------------------------------------------------------------------------------------- a layer's states


def test_without_a_key_function_every_call_gets_the_one_shared_state() -> None:
    states: KeyedStates[State] = KeyedStates(PartitionOptions(), State)
    shared = states.single
    assert shared is not None and shared.key is None
    assert states.get("b", 1) is shared and states.peek("c") is shared
    assert states.items() == [(None, shared)]
    assert len(states.partitions) == 0


def test_a_given_factory_builds_the_shared_state() -> None:
    made = State("made")
    states: KeyedStates[State] = KeyedStates(PartitionOptions(), State, single=lambda: made)
    assert states.single is made


def test_with_a_key_function_each_key_gets_its_own_state_created_on_first_use() -> None:
    states: KeyedStates[State] = KeyedStates(PartitionOptions(key=lambda call: call.inputs["key"]), State)
    assert states.single is None and states.peek("a") is None
    first = states.get("a", 0)
    assert first.key == "a" and states.get("a", 1) is first
    second = states.get("b", 2)
    assert states.peek("b") is second and states.peek("z") is None
    assert states.items() == [("a", first), ("b", second)]


def test_a_layers_states_are_bounded_by_its_partition_options() -> None:
    evicted: list[Hashable] = []
    options = PartitionOptions(key=lambda call: call.inputs["key"], max_keys=1, idle_after=60)
    states: KeyedStates[State] = KeyedStates(options, State, on_evict=lambda key, state: evicted.append(key))
    states.get("a", 0).level = Hold.PROTECTION
    states.get("b", 1)
    assert [key for key, _ in states.items()] == ["b"] and evicted == ["a"]


# ------------------------------------------------------------------------------------------- properties

LEVELS = st.sampled_from([Hold.NOTHING, Hold.PROTECTION, Hold.CALLS])
OPS = st.one_of(
    st.tuples(st.just("call"), st.integers(0, 11), LEVELS),  # get(key), then the call sets what it holds
    st.tuples(st.just("end"), st.integers(0, 11), LEVELS),  # a call on key ended: it holds something else now
    st.tuples(st.just("wait"), st.sampled_from([1, 5, 20]), st.just(Hold.NOTHING)),
)


@settings(max_examples=300, deadline=None)
@given(
    max_keys=st.integers(1, 6),
    idle_after=st.sampled_from([3, 10, 1000]),
    ops=st.lists(OPS, max_size=80),
    expiry=st.booleans(),
)
def test_property_never_evicts_calls_protection_only_under_pressure_and_stays_bounded(
    max_keys: int, idle_after: int, ops: list[tuple[str, int, Hold]], expiry: bool
) -> None:
    """After every get: no state with calls was evicted; a protective one only beyond max_keys (never below it),
    counted, and — unless protection expired on its own — only when no harmless state was left; the
    count is at most max_keys plus the states with calls."""
    parts: Partitions[State] = Partitions(State, max_keys=max_keys, idle_after=idle_after)
    live: dict[Hashable, State] = {}
    now = 0
    for op, arg, level in ops:
        if op == "wait":
            now += arg
            continue
        if op == "end":
            state = live.get(arg)
            if state is not None and state.level is Hold.CALLS:
                state.level = level
            if expiry and state is not None and state.level is Hold.PROTECTION and level is Hold.NOTHING:
                state.level = Hold.NOTHING  # protection that expires by time, without a call
            continue
        before = {k: s.level for k, s in live.items()}
        counted = parts.evicted_protective
        state = parts.get(arg, now)
        after = keys(parts)
        gone = {k: before[k] for k in before.keys() - after}
        assert Hold.CALLS not in gone.values(), gone
        protective = [k for k, held in gone.items() if held is Hold.PROTECTION]
        if protective:
            assert len(after) >= max_keys, (gone, after)  # it went only to come down to max_keys
            if not expiry:
                assert all(before[k] is not Hold.NOTHING for k in after if k != arg and k in before), (
                    "a protective state went while a harmless one stayed"
                )
        assert parts.evicted_protective - counted == len(protective)
        calls = sum(1 for k in after if k != arg and live.get(k, state).level is Hold.CALLS)
        assert len(after) <= max_keys + calls
        live = {k: live.get(k, state) for k in after}
        state.level = level
