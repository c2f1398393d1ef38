"""What the cache key is made of, exactly, and the key function that replaces it.

The key follows the LM in effect (settings or a predictor's own; model, model type, endpoint and sampling kwargs,
also when edited in place), the adapter and its settings, each predictor's name, signature, demos, config and field
criteria, the program class, and the inputs (every canonical form), never secrets; the key text is frozen (a golden
key: keys persist, so a change needs a KEY_VERSION bump), lone surrogates hash, and an LM's identity is computed
once while the LM is unchanged. Each target says what its key is made of (``key_identity()``); the cache never
asks what kind of target it keys. Then the ``key=`` function: what it is handed, how its value is hashed, and a
call whose key cannot be computed runs uncached.
"""

from __future__ import annotations

import datetime
import enum
import functools
import hashlib
import logging
import typing
from types import SimpleNamespace
from typing import Any

import dspy
import pytest
from pydantic import BaseModel, field_serializer

from resilient_dspy import Pipeline
from resilient_dspy.binding.shape import KeyIdentity, qualified_name
from resilient_dspy.core.call import Call
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import Cache, CacheHit, CacheMiss, KeyBuilder, compute_key
from resilient_dspy.middleware.cache import keys as cache_keys
from resilient_dspy.middleware.cache.keys import (
    KEY_VERSION,
    _adapter_identity,
    _canonical,
    _describe_type,
    _digest,
    _dumps,
    _lm_identity,
    _signature_identity,
)
from resilient_dspy.testing import FaultInjectingLM

from .test_cache import Program, keyed, of_type

HERE = __name__


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class Color(enum.Enum):
    RED = "red"


class Point(BaseModel):
    x: int
    when: datetime.date


class Unserializable(BaseModel):
    """A model whose JSON dump raises (its repr still works)."""

    x: int

    @field_serializer("x")
    def _fail(self, value: int) -> int:
        raise ValueError("cannot serialise x")


class TinyLM:
    """An LM-like object keeping its endpoint as an attribute and a secret among its kwargs."""

    def __init__(self, **kwargs: Any) -> None:
        self.model = "tiny/m"
        self.model_type = "text"
        self.api_base = "http://a.local/v1"
        self.kwargs = {"temperature": 0.2, "api_key": "sk-1", "auth_token": "t", **kwargs}


class BareLM:
    """An LM-like object with no model, model_type, kwargs or endpoint attributes at all."""


class TinyAdapter:
    def __init__(self) -> None:
        self.mode = "x"
        self.n = 1
        self.f = 1.5
        self.b = True
        self.none = None
        self.items = [1]
        self.hook = print


class SlotsAdapter:
    __slots__ = ("mode",)

    def __init__(self) -> None:
        self.mode = "x"


class StubTarget:
    """A Target that is none of the known kinds (keys fall back to its class, name, LM and adapter)."""

    name = "stub"
    input_fields: tuple[str, ...] = ("question",)

    async def __call__(self, call: Call) -> Any:
        return None

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name}

    def input_problems(self, inputs: Any) -> list[tuple[str, str]]:
        return []

    def watch_dspy_retries(self) -> None:
        pass


class OtherStubTarget(StubTarget):
    pass


class DuckTarget:
    """A target of one's own that says its identity: a module of the given (duck-typed) predictors."""

    name = "duck"
    input_fields: tuple[str, ...] = ("question",)

    def __init__(self, *predictors: tuple[str, Any]) -> None:
        self.identity = KeyIdentity("module", ("duck",), tuple(predictors))

    async def __call__(self, call: Call) -> Any:
        return None

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name}

    def input_problems(self, inputs: Any) -> list[tuple[str, str]]:
        return []

    def watch_dspy_retries(self) -> None:
        pass

    def key_identity(self) -> KeyIdentity:
        return self.identity


async def ask(question: str, context: Any = None) -> str:
    return question


def key_in(cache: Cache, *args: Any, lm: Any = None, adapter: Any = None, **inputs: Any) -> str:
    with dspy.context(lm=lm, adapter=adapter):
        return cache.key_for(*args, **inputs)


# --------------------------------------------------------------------------------------- the key: canonical forms


def test_canonical_forms_are_exact() -> None:
    """Plain JSON values are their own form; everything else is tagged, and mixed keys/sets sort by their JSON."""
    broken = Unserializable(x=1)
    cases: list[tuple[Any, Any]] = [
        ("s", "s"),
        (7, 7),
        (True, True),
        (None, None),
        (1.5, 1.5),
        (float("nan"), {"$float": "nan"}),
        (float("-inf"), {"$float": "-inf"}),
        ([1, "a", None, False], [1, "a", None, False]),
        ((1, (2,)), {"$tuple": [1, {"$tuple": [2]}]}),
        ({"b": (1,), "a": 2}, {"b": {"$tuple": [1]}, "a": 2}),
        ({1: (2,), "x": "y"}, {"$dict": [["x", "y"], [1, {"$tuple": [2]}]]}),
        ({"$t": 1}, {"$dict": [["$t", 1]]}),
        ({1, "a"}, {"$set": ["a", 1]}),
        (frozenset({(1,)}), {"$set": [{"$tuple": [1]}]}),
        (dspy.Example(q=(1,)), {"$example": {"q": {"$tuple": [1]}}}),
        (Color.RED, {"$enum": f"{HERE}.Color", "v": "red"}),
        (
            Point(x=1, when=datetime.date(2026, 12, 3)),
            {"$model": f"{HERE}.Point", "v": {"x": 1, "when": "2026-12-03"}},
        ),
        (broken, {"$repr": f"{HERE}.Unserializable", "r": repr(broken)}),
        (b"ab", {"$bytes": "6162"}),
        (bytearray(b"\x00"), {"$bytes": "00"}),
        (int, {"$type": "builtins.int"}),
        (1 + 2j, {"$repr": "builtins.complex", "r": "(1+2j)"}),
    ]
    for value, expected in cases:
        assert _canonical(value) == expected, value
        assert type(_canonical(value)) is type(expected), value


def test_an_unhashable_annotation_is_described_by_its_repr() -> None:
    annotation = typing.Annotated[int, []]
    assert _describe_type(annotation) == repr(annotation)
    assert _describe_type(list[int]) == ["builtins.list", ["builtins.int"]]


def test_a_value_canonical_missed_is_a_type_error_naming_its_type() -> None:
    with pytest.raises(TypeError, match="object"):
        _dumps(object())


# --------------------------------------------------------------------------------- the key: its text and identity


def test_the_key_text_is_frozen() -> None:
    """Keys persist (DiskBackend, a shared store): changing their text silently strands every stored entry, so it
    needs a KEY_VERSION bump. A function target with no LM or adapter keeps DSPy's own formats out of these."""
    inputs = {
        "question": "q",
        "context": [1.5, float("nan"), (1,), {2: "b"}, {"s"}, b"x", Color.RED, int, None, True, {"k": "v"}],
    }
    direct = keyed(ask, namespace="golden")
    nested = keyed(Pipeline(ask), namespace="golden")
    assert KEY_VERSION == 2
    assert direct.key_for(**inputs) == "golden:" + sha(
        '[2,["function","tests.middleware.test_cache_keys.ask",null,null],{"context":[1.5,{"$float":"nan"},'
        '{"$tuple":[1]},{"$dict":[[2,"b"]]},{"$set":["s"]},{"$bytes":"78"},'
        '{"$enum":"tests.middleware.test_cache_keys.Color","v":"red"},{"$type":"builtins.int"},null,true,'
        '{"k":"v"}],"question":"q"}]'
    )
    assert nested.key_for(question="q") == "golden:" + sha(
        '[2,["pipeline",["function","tests.middleware.test_cache_keys.ask",null,null]],{"question":"q"}]'
    )
    assert direct.key_for("q") == "golden:" + sha(
        '[2,["function","tests.middleware.test_cache_keys.ask",null,null],{"question":"q"}]'
    )


def test_the_identity_each_target_kind_gives_is_what_the_key_hashes() -> None:
    """The identity list per target kind: the program part, the LM digest (a bare LM: its own), the adapter."""
    lm = FaultInjectingLM("fault/a", temperature=0.3)
    adapter = TinyAdapter()
    lm_digest = _digest(_lm_identity(lm))
    adapter_identity = [f"{HERE}.TinyAdapter", {"mode": "x", "n": 1, "f": 1.5, "b": True, "none": None}]

    lm_keys = KeyBuilder("n", Pipeline(lm).target)
    assert lm_keys.identity(None, None) == ["lm", lm_digest]
    assert lm_keys.identity(FaultInjectingLM("fault/b"), adapter) == ["lm", lm_digest]  # its own LM, no adapter

    program = dspy.Predict("question -> answer")
    module = KeyBuilder("n", Pipeline(program).target).identity(lm, adapter)
    assert module[:2] == ["module", "dspy.predict.predict.Predict"]
    [predictor] = module[2]
    assert (predictor[0], predictor[-1]) == ("self", lm_digest)
    assert module[3:] == [adapter_identity]

    nested = KeyBuilder("n", Pipeline(Pipeline(program)).target)
    assert nested.identity(lm, adapter) == ["pipeline", module]
    twice = KeyBuilder("n", Pipeline(Pipeline(Pipeline(program))).target)
    assert twice.identity(lm, adapter) == ["pipeline", ["pipeline", module]]

    function = KeyBuilder("n", Pipeline(ask).target)
    assert function.identity(lm, adapter) == ["function", f"{HERE}.ask", lm_digest, adapter_identity]

    stub = KeyBuilder("n", StubTarget())
    assert stub.identity(lm, adapter) == ["target", f"{HERE}.StubTarget", "stub", lm_digest, adapter_identity]


def test_the_key_hashes_the_text_of_the_identity_of_every_target_kind() -> None:
    """The memoised fast path and the identity built afresh give the same key, nested pipelines included."""
    program = dspy.Predict("question -> answer")
    lm = FaultInjectingLM("fault/a")
    for target in (
        Pipeline(lm).target,
        Pipeline(program).target,
        Pipeline(Pipeline(program)).target,
        Pipeline(ask).target,
        StubTarget(),
        DuckTarget(("p", program)),
    ):
        keys = KeyBuilder("n", target)
        for adapter in (None, dspy.JSONAdapter()):
            with dspy.context(lm=lm, adapter=adapter):
                expected = "n:" + sha(_dumps([KEY_VERSION, keys.identity(lm, adapter), {"question": "q"}]))
                assert keys.key({"question": "q"}) == expected == keys.key({"question": "q"}), target


def test_a_predictors_identity_is_its_name_signature_demos_config_criteria_and_lm() -> None:
    program = dspy.Predict("question -> answer", temperature=0.5, api_key="sk-1")
    program.demos = [dspy.Example(question="1+1?", answer=(2,))]
    program.fields = {"answer": {"criteria": "short"}}
    lm = TinyLM()
    signature = program.signature
    [predictor] = KeyBuilder("n", Pipeline(program).target).identity(lm)[2]
    assert predictor == [
        "self",
        _signature_identity(signature, signature.__doc__),
        [{"$example": {"question": "1+1?", "answer": {"$tuple": [2]}}}],
        {"temperature": 0.5},
        {"answer": {"criteria": "short"}},
        _digest(_lm_identity(lm)),
    ]
    # a predictor without config/fields/lm attributes (a duck-typed one): None there, the settings LM
    bare = SimpleNamespace(signature=signature, demos=[])
    [duck] = KeyBuilder("n", DuckTarget(("p", bare))).identity(lm)[2]
    assert duck[0] == "p" and duck[2:] == [[], None, None, _digest(_lm_identity(lm))]
    [plain] = KeyBuilder("n", DuckTarget(("p", dspy.Predict("question -> answer")))).identity(None)[2]
    assert plain[3:] == [None, None, None]


def test_the_identity_of_an_lm_and_an_adapter_is_exact() -> None:
    assert _lm_identity(TinyLM()) == [f"{HERE}.TinyLM", "tiny/m@http://a.local/v1", "text", {"temperature": 0.2}]
    assert _lm_identity(TinyLM(api_base="http://b.local/v1", deployment_id="d1")) == [
        f"{HERE}.TinyLM",
        "tiny/m@http://a.local/v1,http://b.local/v1#d1",
        "text",
        {"temperature": 0.2},
    ]
    assert _lm_identity(BareLM()) == [f"{HERE}.BareLM", "BareLM", None, {}]
    odd = BareLM()
    odd.kwargs = None  # type: ignore[attr-defined]
    assert _lm_identity(odd) == [f"{HERE}.BareLM", "BareLM", None, {}]
    assert _adapter_identity(TinyAdapter()) == [
        f"{HERE}.TinyAdapter",
        {"mode": "x", "n": 1, "f": 1.5, "b": True, "none": None},
    ]
    assert _adapter_identity(SlotsAdapter()) == [f"{HERE}.SlotsAdapter", {}]


def test_callable_names_are_module_and_qualname() -> None:
    class Anonymous:
        """A callable with a qualname but no module (as some C or proxy objects have)."""

        def __getattribute__(self, name: str) -> Any:
            if name == "__module__":
                raise AttributeError(name)
            return object.__getattribute__(self, name)

        async def __call__(self, question: str) -> str:
            return question

    anonymous = Anonymous()
    anonymous.__qualname__ = "q"  # type: ignore[attr-defined]
    assert qualified_name(ask) == f"{HERE}.ask"
    assert qualified_name(anonymous) == "?.q"
    assert qualified_name(functools.partial(ask)) == "functools.partial"
    assert qualified_name(TinyLM) == f"{HERE}.TinyLM"


def test_compute_key_is_the_key_of_a_call() -> None:
    cache = Cache(namespace="n")
    pipeline = Pipeline(dspy.Predict("question -> answer"), cache)
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        assert compute_key("n", pipeline.target, {"question": "q"}) == cache.key_for("q")
        assert compute_key("m", pipeline.target, {"question": "q"}).startswith("m:")


# --------------------------------------------------------------------------------------- the key: what it follows


def test_the_key_follows_the_program_class_and_each_predictors_name() -> None:
    class MyPredict(dspy.Predict):  # type: ignore[misc]
        pass

    class Two(dspy.Module):  # type: ignore[misc]
        def __init__(self, swapped: bool) -> None:
            super().__init__()
            if swapped:
                self.second = dspy.Predict("question -> answer")
                self.first = dspy.Predict("question -> reasoning, answer")
            else:
                self.first = dspy.Predict("question -> answer")
                self.second = dspy.Predict("question -> reasoning, answer")

        def forward(self, question: str) -> Any:  # a module needs forward or aforward to be wrapped at all
            return self.first(question=question)

    lm = FaultInjectingLM()
    assert key_in(keyed(dspy.Predict("question -> answer")), "q", lm=lm) != key_in(
        keyed(MyPredict("question -> answer")), "q", lm=lm
    )
    assert key_in(keyed(Two(False)), "q", lm=lm) != key_in(keyed(Two(True)), "q", lm=lm)
    assert key_in(keyed(Two(False)), "q", lm=lm) == key_in(keyed(Two(False)), "q", lm=lm)


def test_the_key_follows_predictor_config_and_field_criteria_but_not_secrets() -> None:
    def key_of(**config: Any) -> str:
        return key_in(keyed(dspy.Predict("question -> answer", **config)), "q", lm=FaultInjectingLM())

    base = key_of(temperature=0.5, api_key="sk-1")
    assert base == key_of(temperature=0.5, api_key="sk-2")
    assert base == key_of(temperature=0.5)
    assert base != key_of(temperature=0.7, api_key="sk-1")
    assert base != key_of()

    program = dspy.Predict("question -> answer")
    cache = keyed(program)
    lm = FaultInjectingLM()
    plain = key_in(cache, "q", lm=lm)
    program.fields["answer"] = {"criteria": "one word"}
    criteria = key_in(cache, "q", lm=lm)
    program.fields["answer"] = {"criteria": "two words"}
    assert len({plain, criteria, key_in(cache, "q", lm=lm)}) == 3


def test_the_key_follows_the_model_type_and_an_api_base_attribute() -> None:
    cache = keyed(dspy.Predict("question -> answer"))
    assert key_in(cache, "q", lm=FaultInjectingLM(model_type="chat")) != key_in(
        cache, "q", lm=FaultInjectingLM(model_type="text")
    )
    a, b = TinyLM(), TinyLM()
    b.api_base = "http://b.local/v1"
    assert key_in(cache, "q", lm=a) != key_in(cache, "q", lm=b)
    assert key_in(cache, "q", lm=TinyLM(api_key="sk-2")) == key_in(cache, "q", lm=a)


def test_the_key_follows_lm_attributes_edited_in_place() -> None:
    """The memoised identity is re-checked against the model, model type, endpoints and kwargs each time."""
    cache = keyed(dspy.Predict("question -> answer"))
    lm = TinyLM()
    seen = [key_in(cache, "q", lm=lm)]
    for attribute, value in (
        ("model", "tiny/other"),
        ("model_type", "chat"),
        ("api_base", "http://b.local/v1"),
        ("base_url", "http://c.local/v1"),
    ):
        setattr(lm, attribute, value)
        seen.append(key_in(cache, "q", lm=lm))
    lm.kwargs["temperature"] = 0.9
    seen.append(key_in(cache, "q", lm=lm))
    assert len(set(seen)) == len(seen)


def test_an_lm_without_the_usual_attributes_still_has_a_key() -> None:
    cache = keyed(dspy.Predict("question -> answer"))
    odd = BareLM()
    odd.kwargs = None  # type: ignore[attr-defined]
    bare = key_in(cache, "q", lm=BareLM())
    assert bare == key_in(cache, "q", lm=BareLM())
    assert key_in(cache, "q", lm=odd) == bare
    assert bare != key_in(cache, "q", lm=TinyLM())


def test_the_key_follows_the_lm_class() -> None:
    class OtherLM(TinyLM):
        pass

    cache = keyed(dspy.Predict("question -> answer"))
    assert key_in(cache, "q", lm=TinyLM()) != key_in(cache, "q", lm=OtherLM())


def test_an_lm_identity_is_computed_once_while_the_lm_is_unchanged(monkeypatch: pytest.MonkeyPatch) -> None:
    computed: list[Any] = []
    real = cache_keys._lm_identity

    def counting(lm: Any) -> Any:
        computed.append(lm)
        return real(lm)

    monkeypatch.setattr(cache_keys, "_lm_identity", counting)
    cache = keyed(dspy.Predict("question -> answer"))
    lm = TinyLM()
    first = key_in(cache, "q", lm=lm)
    assert key_in(cache, "r", lm=lm) != first
    assert key_in(cache, "q", lm=lm) == first
    assert computed == [lm]
    lm.kwargs["temperature"] = 0.9
    key_in(cache, "q", lm=lm)
    key_in(cache, "q", lm=lm)
    assert computed == [lm, lm]


def test_the_lm_memo_forgets_every_lm_when_a_65th_arrives(monkeypatch: pytest.MonkeyPatch) -> None:
    """At most 64 LMs' identities are remembered: a 65th empties the memo first, so the first is computed again."""
    computed: list[Any] = []
    real = cache_keys._lm_identity

    def counting(lm: Any) -> Any:
        computed.append(lm)
        return real(lm)

    monkeypatch.setattr(cache_keys, "_lm_identity", counting)
    keys = KeyBuilder("n", Pipeline(ask).target)
    lms = [TinyLM(seed=i) for i in range(65)]
    for lm in lms[:64]:
        keys.identity(lm)
    keys.identity(lms[0])
    assert computed == lms[:64]  # all 64 remembered
    keys.identity(lms[64])
    keys.identity(lms[0])
    assert computed == [*lms, lms[0]]


def test_the_key_follows_adapter_settings_and_a_slotted_adapter_has_one() -> None:
    cache = keyed(dspy.Predict("question -> answer"))
    lm = FaultInjectingLM()
    plain = key_in(cache, "q", lm=lm, adapter=dspy.ChatAdapter())
    assert plain == key_in(cache, "q", lm=lm, adapter=dspy.ChatAdapter())
    assert plain != key_in(cache, "q", lm=lm, adapter=dspy.ChatAdapter(use_native_function_calling=True))
    assert key_in(cache, "q", lm=lm, adapter=SlotsAdapter()) not in (plain, key_in(cache, "q", lm=lm))


def test_a_nested_pipeline_and_a_plain_target_follow_the_lm_and_adapter() -> None:
    nested = keyed(Pipeline(dspy.Predict("question -> answer")))
    plain = keyed(dspy.Predict("question -> answer"))
    a, b = FaultInjectingLM("fault/a"), FaultInjectingLM("fault/b")
    keys = {
        key_in(nested, "q", lm=a),
        key_in(nested, "q", lm=b),
        key_in(nested, "q", lm=a, adapter=dspy.JSONAdapter()),
        key_in(plain, "q", lm=a),
    }
    assert len(keys) == 4

    stub, other = KeyBuilder("n", StubTarget()), KeyBuilder("n", OtherStubTarget())
    with dspy.context(lm=a):
        stub_a = stub.key({"question": "q"})
        assert other.key({"question": "q"}) != stub_a
        with dspy.context(adapter=dspy.JSONAdapter()):
            assert stub.key({"question": "q"}) != stub_a
    with dspy.context(lm=b):
        assert stub.key({"question": "q"}) != stub_a


def test_inputs_not_flat_are_hashed_in_canonical_form() -> None:
    """Only str-named scalar inputs skip the canonical walk; a '$' name or a non-scalar value takes it."""
    keys = KeyBuilder("n", Pipeline(ask).target)

    def expected(inputs: dict[str, Any]) -> str:
        return "n:" + sha(_dumps([KEY_VERSION, keys.identity(), _canonical(inputs)]))

    for inputs in ({"$x": "1"}, {"$tuple": "a"}, {"context": ("a",)}, {"question": "q", "context": 1.5}):
        assert keys.key(inputs) == expected(inputs)
    assert keys.key({"context": ("a", "b")}) != keys.key({"context": ["a", "b"]})


def test_lone_surrogates_in_inputs_and_lm_kwargs_hash() -> None:
    """JSON keeps a lone surrogate as it is; the key encodes it with surrogatepass instead of failing."""
    cache = keyed(dspy.Predict("question -> answer"))
    lm = FaultInjectingLM()
    first = key_in(cache, "\ud800", lm=lm)
    assert first != key_in(cache, "\ud801", lm=lm)
    stops = {key_in(cache, "q", lm=TinyLM(stop="\udc00")), key_in(cache, "q", lm=TinyLM(stop="\udc01"))}
    assert len(stops) == 2
    assert keyed(ask, key=lambda call: call.inputs["question"]).key_for("\ud800") == "default:" + sha("\ud800")
    assert keyed(ask, key=lambda call: [call.inputs["question"]]).key_for("\ud800") == "default:" + sha('["\ud800"]')


# ------------------------------------------------------------------------------------------------- a key function


def test_a_string_from_the_key_function_is_hashed_as_it_is() -> None:
    cache = keyed(ask, namespace="n", key=lambda call: call.inputs["question"])
    assert cache.key_for("k") == "n:" + hashlib.sha256(b"k").hexdigest()
    assert cache.key_for("k") != cache.key_for("j")


def test_other_values_from_the_key_function_are_hashed_in_canonical_form() -> None:
    cache = keyed(ask, namespace="n", key=lambda call: tuple(call.inputs["question"]))
    assert cache.key_for("ab") == "n:" + sha(_dumps({"$tuple": ["a", "b"]}))
    listed = keyed(ask, namespace="n", key=lambda call: list(call.inputs["question"]))
    assert listed.key_for("ab") == "n:" + sha('["a","b"]')
    assert cache.key_for("ab") != cache.key_for("ba")


def test_key_for_hands_the_key_function_a_call_started_at_zero() -> None:
    calls: list[Any] = []

    def key(call: Any) -> str:
        calls.append(call)
        return str(call.inputs["question"])

    cache = Cache(key=key)
    pipeline = Pipeline(ask, cache, name="p")
    cache.key_for("q")
    [call] = calls
    assert call.runtime is pipeline.runtime
    assert call.record.started_at == 0.0
    assert call.inputs == {"question": "q"}


async def test_calls_use_the_key_function_under_the_namespace() -> None:
    program = Program()
    cache = Cache(namespace="n", key=lambda call: call.inputs["question"].lower())
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append])
    await pipeline("Q")
    await pipeline("q")
    await pipeline("r")
    assert program.calls == 2
    assert [e.key for e in of_type(events, CacheMiss)] == ["n:" + sha("q"), "n:" + sha("r")]
    assert [e.key for e in of_type(events, CacheHit)] == ["n:" + sha("q")]


async def test_a_key_function_that_raises_runs_the_call_uncached(caplog: pytest.LogCaptureFixture) -> None:
    def key(call: Any) -> str:
        raise KeyError("no key")

    program = Program()
    cache = Cache(key=key, name="c")
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    [record] = caplog.records
    assert record.levelno == logging.ERROR and record.getMessage().startswith("c: ")
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)
    assert (program.calls, cache.snapshot().misses) == (1, 0)


async def test_a_cache_outside_a_pipeline_runs_the_call_uncached(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache()
    call = Pipeline(Program()).new_call({"question": "q"})
    seen: list[Any] = []

    async def next_(handed: Any) -> str:
        seen.append(handed)
        return "ran"

    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert await cache(call, next_) == "ran"
    assert seen == [call]
    [record] = caplog.records
    assert record.getMessage().startswith("Cache: ")
    assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
    assert "Pipeline" in str(record.exc_info[1])


def test_a_repeated_key_is_the_key_computed_afresh_and_follows_the_lm_and_adapter() -> None:
    """Asking again for the key of the same inputs gives what a new KeyBuilder computes, under the LM and adapter in
    effect at each call; a str, an int and a bool input of the same text get different keys."""
    target = Pipeline(dspy.Predict("question -> answer")).target
    keys = KeyBuilder("n", target)
    a, b = FaultInjectingLM("fault/a"), FaultInjectingLM("fault/b")
    seen = set()
    for lm, adapter in ((a, None), (b, None), (a, dspy.JSONAdapter()), (a, None)):
        with dspy.context(lm=lm, adapter=adapter):
            first = keys.key({"question": "q"})
            assert keys.key({"question": "q"}) == first == KeyBuilder("n", target).key({"question": "q"})
            seen.add(first)
    assert len(seen) == 3
    with dspy.context(lm=a):
        assert len({keys.key({"question": value}) for value in ("1", 1, True, "1")}) == 3
        a.kwargs["temperature"] = 0.9  # an LM changed in place after its key was remembered
        assert keys.key({"question": "q"}) not in seen
