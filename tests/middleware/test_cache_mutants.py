"""Exact-value tests written from mutmut's survivors on cache.py (see docs/mutation-testing.md).

The key builder first: the key follows the LM in effect (settings or a predictor's own; model, model type,
endpoint and sampling kwargs, also when edited in place), the adapter and its settings, each predictor's name,
signature, demos, config and field criteria, the program class, and the inputs (every ``_canonical`` form), never
secrets; the key text is frozen (a golden key), lone surrogates hash, and an LM's identity is memoised. Then the
custom key function, event fields (times included), log messages, usage and cost saved by hits and followers,
followers' own copies, type allow-listing after build, non-blocking and recording backends, health and describe.

Every async test runs on looptime's virtual loop clock, so latencies and the backend timeout cost no real time.
"""

from __future__ import annotations

import asyncio
import collections
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
from resilient_dspy.core.call import Call
from resilient_dspy.errors import ConfigurationError
from resilient_dspy.events import Event
from resilient_dspy.middleware.cache import (
    Cache,
    CacheBackendFailed,
    CacheCoalesced,
    CacheHit,
    CacheMiss,
    CacheNotStored,
    CacheStored,
    KeyBuilder,
    compute_key,
)
from resilient_dspy.middleware.cache import keys as cache_module
from resilient_dspy.middleware.cache.backends import MemoryBackend
from resilient_dspy.middleware.cache.keys import (
    KEY_VERSION,
    _adapter_identity,
    _callable_name,
    _canonical,
    _describe_type,
    _digest,
    _dumps,
    _lm_identity,
    _signature_identity,
)
from resilient_dspy.middleware.cache.serializer import UnknownTypeError
from resilient_dspy.testing import FaultInjectingLM

from .test_cache import BrokenBackend, HangingBackend, NowaitOnly, Program, keyed, of_type

HERE = __name__


def now() -> float:
    return asyncio.get_running_loop().time()


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


class Verdict(BaseModel):
    text: str
    confidence: float


class Typed(dspy.Signature):  # type: ignore[misc]
    """Answer with a verdict."""

    question: str = dspy.InputField()
    answer: Verdict = dspy.OutputField()


def verdict_lm() -> FaultInjectingLM:
    return FaultInjectingLM(answers=lambda question: '{"text": "yes", "confidence": 0.5}')


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

    def watch_dspy_retries(self) -> None:
        pass


class OtherStubTarget(StubTarget):
    pass


async def ask(question: str, context: Any = None) -> str:
    return question


def key_in(cache: Cache, *args: Any, lm: Any = None, adapter: Any = None, **inputs: Any) -> str:
    with dspy.context(lm=lm, adapter=adapter):
        return cache.key_for(*args, **inputs)


def report_usage(prompt: int, completion: int) -> None:
    dspy.settings.usage_tracker.add_usage(
        "test/model",
        {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
    )


USAGE = {"test/model": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}}


# -------------------------------------------------------------------------------------- the key: canonical forms


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
    with pytest.raises(TypeError) as raised:
        _dumps(object())
    assert str(raised.value) == "Object of type object is not JSON serializable"


# ---------------------------------------------------------------------------------------- the key: its text


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
        '[2,["function","tests.middleware.test_cache_mutants.ask",null,null],{"context":[1.5,{"$float":"nan"},'
        '{"$tuple":[1]},{"$dict":[[2,"b"]]},{"$set":["s"]},{"$bytes":"78"},'
        '{"$enum":"tests.middleware.test_cache_mutants.Color","v":"red"},{"$type":"builtins.int"},null,true,'
        '{"k":"v"}],"question":"q"}]'
    )
    assert nested.key_for(question="q") == "golden:" + sha(
        '[2,["pipeline",["function","tests.middleware.test_cache_mutants.ask",null,null]],{"question":"q"}]'
    )
    assert direct.key_for("q") == "golden:" + sha(
        '[2,["function","tests.middleware.test_cache_mutants.ask",null,null],{"question":"q"}]'
    )


def test_the_identity_of_each_target_kind() -> None:
    """The tagged identity lists the key hashes, per target kind (the program part, the LM digest, the adapter)."""
    lm = FaultInjectingLM("fault/a", temperature=0.3)
    adapter = TinyAdapter()
    lm_digest = _digest(_lm_identity(lm))

    lm_keys = KeyBuilder("n", Pipeline(lm).target)
    assert lm_keys._identity(lm_keys.target, None, None) == ["lm", lm_digest]

    program = dspy.Predict("question -> answer")
    module_keys = KeyBuilder("n", Pipeline(program).target)
    predictor = module_keys._predictor("self", program, lm)
    assert predictor[0] == "self"
    assert module_keys._identity(module_keys.target, lm, adapter) == [
        "module",
        "dspy.predict.predict.Predict",
        [predictor],
        [f"{HERE}.TinyAdapter", {"mode": "x", "n": 1, "f": 1.5, "b": True, "none": None}],
    ]

    nested = KeyBuilder("n", Pipeline(Pipeline(program)).target)
    assert nested._identity(nested.target, lm, adapter) == [
        "pipeline",
        module_keys._identity(module_keys.target, lm, adapter),
    ]

    stub = KeyBuilder("n", StubTarget())
    assert stub._identity(stub.target, lm, adapter) == [
        "target",
        f"{HERE}.StubTarget",
        "stub",
        lm_digest,
        _adapter_identity(adapter),
    ]


def test_a_predictors_identity_is_its_name_signature_demos_config_criteria_and_lm() -> None:
    program = dspy.Predict("question -> answer", temperature=0.5, api_key="sk-1")
    program.demos = [dspy.Example(question="1+1?", answer=(2,))]
    program.fields = {"answer": {"criteria": "short"}}
    lm = TinyLM()
    keys = KeyBuilder("n", Pipeline(program).target)
    signature = program.signature
    assert keys._predictor("p", program, lm) == [
        "p",
        _signature_identity(signature, signature.__doc__),
        [{"$example": {"question": "1+1?", "answer": {"$tuple": [2]}}}],
        {"temperature": 0.5},
        {"answer": {"criteria": "short"}},
        _digest(_lm_identity(lm)),
    ]
    # a predictor without config/fields/lm attributes (a duck-typed one): None there, the settings LM
    bare = SimpleNamespace(signature=signature, demos=[])
    assert keys._predictor("p", bare, lm)[2:] == [[], None, None, _digest(_lm_identity(lm))]
    plain = dspy.Predict("question -> answer")
    assert keys._predictor("p", plain, None)[3:] == [None, None, None]


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
    assert _callable_name(ask) == f"{HERE}.ask"
    assert _callable_name(anonymous) == "?.q"
    assert _callable_name(functools.partial(ask)) == "functools.partial"


def test_compute_key_is_the_key_of_a_call() -> None:
    cache = keyed(dspy.Predict("question -> answer"), namespace="n")
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        assert compute_key("n", cache._pipeline.target, {"question": "q"}) == cache.key_for("q")  # type: ignore[union-attr]
        assert compute_key("m", cache._pipeline.target, {"question": "q"}).startswith("m:")  # type: ignore[union-attr]


# -------------------------------------------------------------------------------- the key: what it follows


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
    real = cache_module._lm_identity

    def counting(lm: Any) -> Any:
        computed.append(lm)
        return real(lm)

    monkeypatch.setattr(cache_module, "_lm_identity", counting)
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


def test_the_lm_memo_holds_at_most_64_lms() -> None:
    keys = KeyBuilder("n", Pipeline(dspy.Predict("question -> answer")).target)
    lms = [TinyLM(seed=i) for i in range(65)]
    for lm in lms:
        keys._lm(lm)
    assert len(keys._lms) == 1


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
        identity = keys._identity(keys.target, None, None)
        return "n:" + sha(_dumps([KEY_VERSION, identity, _canonical(inputs)]))

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


# ---------------------------------------------------------------------------------------- a key function


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
    assert record.getMessage() == "c: could not compute the key; the call runs uncached"
    assert record.exc_info is not None and isinstance(record.exc_info[1], KeyError)
    assert (program.calls, cache.stats.misses) == (1, 0)


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
    assert record.getMessage() == "Cache: could not compute the key; the call runs uncached"
    assert record.exc_info is not None
    assert str(record.exc_info[1]) == "Cache.on_build was not called: use the Cache inside a Pipeline"


# ------------------------------------------------------------------------------------- events, logs, health, describe


async def test_miss_store_and_hit_events_carry_every_field() -> None:
    cache = Cache(ttl=30.0, name="answers")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="qa")
    await pipeline("q")
    await pipeline("q")
    [miss] = of_type(events, CacheMiss)
    [stored] = of_type(events, CacheStored)
    [hit] = of_type(events, CacheHit)
    key = cache.key_for("q")
    assert (miss.pipeline, miss.layer, miss.key, miss.bypassed) == ("qa", "answers", key, False)
    assert (stored.pipeline, stored.layer, stored.key, stored.ttl) == ("qa", "answers", key, 30.0)
    assert stored.size == len(await cache.backend.get(key))
    assert (hit.pipeline, hit.layer, hit.key, hit.saved_tokens, hit.saved_usage) == ("qa", "answers", key, 0, {})


async def test_a_failing_backend_logs_exact_messages_and_emits_full_events(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(BrokenBackend(), name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="p")
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    key = cache.key_for("q")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        f"c: backend get failed for {key} (ConnectionError('backend down (get)')); going on without it",
        f"c: backend set failed for {key} (OSError('backend down (set)')); going on without it",
    ]
    get, set_ = of_type(events, CacheBackendFailed)
    assert (get.pipeline, get.layer, get.key, get.operation, get.timed_out) == ("p", "c", key, "get", False)
    assert str(get.error) == "backend down (get)"
    assert (set_.key, set_.operation, set_.timed_out) == (key, "set", False)
    assert cache.stats.errors == 2 and cache.stats.stores == 0 and cache.stats.misses == 1


async def test_a_hanging_backend_logs_the_timeout(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache(HangingBackend(), backend_timeout=0.25, name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
        await cache.drain()
    key = cache.key_for("q")
    assert [r.getMessage() for r in caplog.records] == [
        f"c: backend get took over 0.25s for {key}; going on without it",
        f"c: backend set took over 0.25s for {key}; going on without it",
    ]
    failures = of_type(events, CacheBackendFailed)
    assert [(f.key, f.operation, f.timed_out, type(f.error)) for f in failures] == [
        (key, "get", True, TimeoutError),
        (key, "set", True, TimeoutError),
    ]


async def test_a_non_bytes_entry_is_a_miss_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    class StrBackend(MemoryBackend):
        async def get(self, key: str) -> Any:
            return "not bytes"

    program = Program()
    cache = Cache(StrBackend(), name="c")
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        assert (await pipeline("q")).answer == "answer to q"
    key = cache.key_for("q")
    assert program.calls == 1
    assert f"c: backend returned a str for {key}; treated as a miss" in [r.getMessage() for r in caplog.records]
    assert (cache.stats.hits, cache.stats.misses, cache.stats.stores) == (0, 1, 1)


async def test_a_corrupt_entry_is_logged_with_its_key(caplog: pytest.LogCaptureFixture) -> None:
    backend = MemoryBackend()
    cache = Cache(backend, name="c")
    pipeline = Pipeline(Program(), cache)
    key = cache.key_for("q")
    await backend.set(key, b"garbage", None)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    [message] = [r.getMessage() for r in caplog.records]
    assert message == f"c: unreadable entry {key} (not a cache entry: not JSON); treated as a miss"
    assert cache.stats.misses == 1 and cache.stats.stores == 1


async def test_followers_share_one_call_and_get_their_own_copy() -> None:
    program = Program(latency=1.0)
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(program, cache, listeners=[events.append], name="p")
    first, second, third = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert program.calls == 1
    assert first.answer == second.answer == third.answer == "answer to q"
    assert second is not first and third is not second
    assert (cache.stats.coalesced, cache.stats.misses, cache.stats.stores) == (2, 1, 1)
    key = cache.key_for("q")
    coalesced = of_type(events, CacheCoalesced)
    assert [(e.pipeline, e.layer, e.key, e.error, e.saved_tokens, e.saved_usage) for e in coalesced] == [
        ("p", "c", key, None, 0, {})
    ] * 2


def test_health_details_and_state() -> None:
    cache = Cache(name="c")
    Pipeline(Program(), cache)
    health = cache.health()
    assert health.status == "ok"
    assert health.details == {
        "hit_rate": 0.0,
        "hits": 0,
        "misses": 0,
        "coalesced": 0,
        "bypassed": 0,
        "backend_errors": 0,
        "backend_timeouts": 0,
        "stores_pending": 0,
        "stores_skipped": 0,
        "saved_tokens": 0,
        "saved_cost": 0.0,
    }


async def test_health_after_hits_coalesced_and_errors() -> None:
    cache = Cache(BrokenBackend(get=False, set=True), name="c")
    pipeline = Pipeline(Program(latency=1.0), cache)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    health = cache.health()
    assert health.status == "degraded"
    assert health.details["hit_rate"] == pytest.approx(0.5)
    assert (health.details["misses"], health.details["coalesced"], health.details["backend_errors"]) == (1, 1, 1)


def test_describe_is_exact() -> None:
    def my_key(call: Any) -> str:
        return "k"

    def my_price(usage: Any) -> float:
        return 0.0

    cache = Cache(ttl=5.0, namespace="n", key=my_key, price=my_price, single_flight=False, backend_timeout=2.0)
    [described, _] = Pipeline(Program(), cache).describe()
    options = described["options"]
    assert options["ttl"] == 5.0 and options["namespace"] == "n"
    assert "my_key" in options["key"] and "my_price" in options["price"]
    assert options["single_flight"] is False and options["backend_timeout"] == 2.0
    assert isinstance(options["types"], list)
    [plain, _] = Pipeline(Program(), Cache()).describe()
    assert plain["options"]["key"] is None and plain["options"]["price"] is None
    assert plain["options"]["single_flight"] is True


# ------------------------------------------------------------------------------------- defaults, build, describe


def test_defaults_label_and_types_are_exact() -> None:
    cache = Cache()
    assert (cache.options.ttl, cache.options.backend_timeout, cache.label) == (3600.0, 1.0, "Cache")
    Pipeline(Program(), cache)
    assert cache.health().layer == "Cache"
    assert Cache(name="c").health().layer == "c"
    typed = Cache(types=[Point, Color])
    assert typed.options.types == (Point, Color)
    assert typed.describe()["options"]["types"] == [f"{HERE}.Point", f"{HERE}.Color"]
    with pytest.raises(ConfigurationError):
        Cache(types=Point)  # type: ignore[arg-type]


def test_one_cache_per_pipeline_is_explained() -> None:
    cache = Cache()
    Pipeline(Program(), cache, name="first")
    with pytest.raises(ConfigurationError) as raised:
        Pipeline(Program(), cache, name="second")
    assert raised.value.problems == (
        ("Cache", "already built into pipeline 'first'; use one Cache per pipeline (they can share a backend)"),
    )


def test_key_for_before_a_pipeline_says_how_to_build_one() -> None:
    with pytest.raises(RuntimeError) as raised:
        Cache().key_for("q")
    assert str(raised.value) == ("this Cache is not part of a pipeline yet: build Pipeline(program, ..., cache) first")


# -------------------------------------------------------------------------------------------- events, exactly


async def test_event_times_are_the_pipeline_clock() -> None:
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(latency=2.0), cache, listeners=[events.append], name="p")
    await asyncio.sleep(3.0)
    await asyncio.gather(pipeline("q"), pipeline("q"))
    await asyncio.sleep(1.0)
    await pipeline("q")
    [miss] = of_type(events, CacheMiss)
    [stored] = of_type(events, CacheStored)
    [coalesced] = of_type(events, CacheCoalesced)
    [hit] = of_type(events, CacheHit)
    assert (miss.time, stored.time, coalesced.time, hit.time) == (3.0, 5.0, 5.0, 6.0)


async def test_backend_failure_and_not_stored_events_carry_every_field() -> None:
    class Opaque:
        pass

    async def opaque(question: str) -> Any:
        await asyncio.sleep(1.0)
        return Opaque()

    events: list[Event] = []
    cache = Cache(NowaitOnly(fail=True), name="c")
    pipeline = Pipeline(opaque, cache, listeners=[events.append], name="p")
    await asyncio.sleep(2.0)
    await pipeline("q")
    key = cache.key_for("q")
    [get] = of_type(events, CacheBackendFailed)  # unencodable: nothing to set
    assert (get.pipeline, get.layer, get.time, get.key, get.operation) == ("p", "c", 2.0, key, "get")
    [not_stored] = of_type(events, CacheNotStored)
    assert (not_stored.pipeline, not_stored.layer, not_stored.time, not_stored.key, not_stored.reason) == (
        "p",
        "c",
        3.0,
        key,
        "unencodable",
    )


async def test_a_failing_nowait_set_names_its_key() -> None:
    class SetFails(NowaitOnly):
        def set_nowait(self, key: str, value: bytes, ttl: float | None) -> None:
            raise OSError("full")

        async def set(self, key: str, value: bytes, ttl: float | None) -> None:
            raise AssertionError("the Cache awaited set() of a backend with set_nowait()")

    events: list[Event] = []
    cache = Cache(SetFails(), name="c")
    pipeline = Pipeline(Program(), cache, listeners=[events.append], name="p")
    await asyncio.sleep(4.0)
    await pipeline("q")
    [failed] = of_type(events, CacheBackendFailed)
    assert (failed.time, failed.key, failed.operation, str(failed.error)) == (4.0, cache.key_for("q"), "set", "full")


async def test_bypassed_calls_are_counted_and_keyed() -> None:
    cache = Cache()
    events: list[Event] = []
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    for _ in range(2):
        await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
    key = cache.key_for("q")
    assert cache.stats.bypassed == 2
    assert [(e.key, e.bypassed) for e in of_type(events, CacheMiss)] == [(key, True), (key, True)]


async def test_followers_of_a_failed_leader_get_its_error_in_their_events() -> None:
    error = ValueError("leader failed")
    cache = Cache(name="c")
    events: list[Event] = []
    pipeline = Pipeline(Program(error, latency=2.0), cache, listeners=[events.append], name="p")
    results = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"), return_exceptions=True)
    assert list(results) == [error, error, error]
    key = cache.key_for("q")
    coalesced = of_type(events, CacheCoalesced)
    assert [(e.pipeline, e.layer, e.time, e.key, e.error, e.saved_tokens, e.saved_usage) for e in coalesced] == [
        ("p", "c", 2.0, key, error, 0, {})
    ] * 2


# ---------------------------------------------------------------------------------------------- single-flight


class CountingBackend(MemoryBackend):
    """A blocking (awaited, under backend_timeout) memory backend counting its reads, which take ``read_latency``."""

    blocking = True

    def __init__(self, read_latency: float = 0.0) -> None:
        super().__init__()
        self.reads = 0
        self.read_latency = read_latency
        self.writes: list[tuple[str, bytes, float | None]] = []

    async def get(self, key: str) -> bytes | None:
        self.reads += 1
        if self.read_latency:
            await asyncio.sleep(self.read_latency)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        self.writes.append((key, value, ttl))
        await super().set(key, value, ttl)


async def test_followers_of_a_flight_in_progress_never_read_the_backend() -> None:
    backend = CountingBackend()
    program = Program(latency=1.0)
    cache = Cache(backend)
    pipeline = Pipeline(program, cache)
    await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert (backend.reads, program.calls, cache.stats.coalesced) == (1, 1, 2)


async def test_callers_that_read_together_share_the_first_ones_flight() -> None:
    """All three read the slow backend at once; the first to finish leads, the other two follow it."""
    backend = CountingBackend(read_latency=0.5)
    program = Program(latency=1.0)
    cache = Cache(backend)
    pipeline = Pipeline(program, cache)
    await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert (backend.reads, program.calls, cache.stats.misses, cache.stats.coalesced) == (3, 1, 1, 2)
    assert now() == 1.5


# --------------------------------------------------------------------------------- backends: blocking or not


async def test_a_blocking_backend_is_written_with_the_key_bytes_and_ttl() -> None:
    backend = CountingBackend()
    events: list[Event] = []
    cache = Cache(backend, ttl=30.0)
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    await pipeline("q")
    await cache.drain()
    key = cache.key_for("q")
    [(written_key, data, ttl)] = backend.writes
    assert (written_key, ttl) == (key, 30.0)
    [stored] = of_type(events, CacheStored)
    assert (stored.key, stored.size) == (key, len(data))
    assert (await pipeline("q")).answer == "answer to q"
    assert cache.stats.hits == 1


class SlowNonBlocking(CountingBackend):
    """Declares ``blocking = False`` without the nowait pair: awaited, but never cut by backend_timeout."""

    blocking = False

    async def get(self, key: str) -> bytes | None:
        await asyncio.sleep(3.0)
        return await super().get(key)

    async def set(self, key: str, value: bytes, ttl: float | None) -> None:
        await asyncio.sleep(3.0)
        await super().set(key, value, ttl)


async def test_a_non_blocking_backend_is_waited_for_past_backend_timeout() -> None:
    backend = SlowNonBlocking()
    events: list[Event] = []
    cache = Cache(backend, ttl=30.0, backend_timeout=1.0)
    pipeline = Pipeline(Program(), cache, listeners=[events.append])
    await pipeline("q")
    key = cache.key_for("q")
    assert [(k, ttl) for k, _, ttl in backend.writes] == [(key, 30.0)]
    assert (await pipeline("q")).answer == "answer to q"
    assert (cache.stats.hits, cache.stats.errors) == (1, 0)
    [stored] = of_type(events, CacheStored)
    assert (stored.key, stored.size) == (key, len(backend.writes[0][1]))
    assert now() == 9.0


# ------------------------------------------------------------------------------------ usage, cost and copies


async def usage_program(question: str) -> dspy.Prediction:
    await asyncio.sleep(1.0)
    report_usage(3, 4)
    return dspy.Prediction(answer=question, tags=[question])


async def test_hits_and_followers_save_the_stored_usage_and_cost() -> None:
    events: list[Event] = []
    cache = Cache(price=lambda usage: usage["test/model"]["total_tokens"] * 0.5, name="c")
    pipeline = Pipeline(usage_program, cache, listeners=[events.append])
    with dspy.context(track_usage=True):
        leader, follower = await asyncio.gather(pipeline("q"), pipeline("q"))
        hit = await pipeline("q")
    assert leader.get_lm_usage() == follower.get_lm_usage() == hit.get_lm_usage() == USAGE
    [coalesced] = of_type(events, CacheCoalesced)
    [cached] = of_type(events, CacheHit)
    assert (coalesced.saved_tokens, coalesced.saved_usage) == (7, USAGE)
    assert (cached.saved_tokens, cached.saved_usage) == (7, USAGE)
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (14, 7.0)


async def test_without_a_price_usage_costs_nothing_and_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache()
    pipeline = Pipeline(usage_program, cache)
    with caplog.at_level(logging.DEBUG, logger="resilient_dspy.cache"):
        await asyncio.gather(pipeline("q"), pipeline("q"))
        await pipeline("q")
    assert caplog.records == []
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (14, 0.0)


async def test_a_failing_price_function_is_logged_and_left_out(caplog: pytest.LogCaptureFixture) -> None:
    def price(usage: Any) -> float:
        raise ZeroDivisionError("no price")

    cache = Cache(price=price, name="c")
    pipeline = Pipeline(usage_program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
        await pipeline("q")
    [record] = caplog.records
    assert record.getMessage() == "c: the price function failed; saved_cost leaves this answer out"
    assert record.exc_info is not None and isinstance(record.exc_info[1], ZeroDivisionError)
    assert (cache.stats.saved_tokens, cache.stats.saved_cost) == (7, 0.0)


class Opaque:
    """Not encodable: answers holding one are never stored, and followers get deep copies."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Opaque)

    __hash__ = object.__hash__


async def test_followers_of_an_unencodable_answer_get_their_own_deep_copies(caplog: pytest.LogCaptureFixture) -> None:
    async def program(question: str) -> dspy.Prediction:
        await asyncio.sleep(1.0)
        report_usage(3, 4)
        return dspy.Prediction(answer=Opaque(), tags=[question])

    events: list[Event] = []
    cache = Cache(name="c")
    pipeline = Pipeline(program, cache, listeners=[events.append])
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"), dspy.context(track_usage=True):
        leader, first, second = await asyncio.gather(pipeline("q"), pipeline("q"), pipeline("q"))
    assert [r.getMessage() for r in caplog.records] == [
        f"c: answer not cached: cannot cache a {HERE}.Opaque: no safe encoding for this type"
    ]
    for follower in (first, second):
        assert follower is not leader
        assert (follower.answer, follower.tags, follower.get_lm_usage()) == (Opaque(), ["q"], USAGE)
    first.tags.append("mutated")
    first.get_lm_usage()["test/model"]["total_tokens"] = 0
    assert leader.tags == second.tags == ["q"]
    assert second.get_lm_usage() == USAGE
    [coalesced, _] = of_type(events, CacheCoalesced)
    assert (coalesced.saved_tokens, coalesced.saved_usage) == (7, USAGE)


async def test_followers_get_the_stored_form_of_the_answer_as_hits_do() -> None:
    """The leader keeps its own object; followers and later hits get the answer as stored (decoded)."""

    async def ordered(question: str) -> Any:
        await asyncio.sleep(1.0)
        return collections.OrderedDict(answer=question)

    pipeline = Pipeline(ordered, Cache())
    leader, follower = await asyncio.gather(pipeline("q"), pipeline("q"))
    hit = await pipeline("q")
    assert type(leader) is collections.OrderedDict
    assert (type(follower), type(hit)) == (dict, dict)
    assert follower == hit == {"answer": "q"}


# --------------------------------------------------------------------------------- types allowed after build


async def test_a_model_type_added_after_build_is_allowed_when_encoding() -> None:
    program = dspy.Predict("question -> answer")
    cache = Cache()
    pipeline = Pipeline(program, cache)
    program.signature = Typed
    lm = verdict_lm()
    with dspy.context(lm=lm):
        first = await pipeline("q")
        hit = await pipeline("q")
    assert hit.answer == first.answer == Verdict(text="yes", confidence=0.5)
    assert (lm.requests, cache.stats.stores, cache.stats.hits) == (1, 1, 1)


async def test_a_model_type_added_after_build_is_allowed_when_decoding() -> None:
    """Another cache stored a typed answer; this one learns the type only when its signature changes."""
    backend = MemoryBackend()
    lm = verdict_lm()
    writer = Pipeline(dspy.Predict(Typed), Cache(backend))
    program = dspy.Predict("question -> answer")
    reader_cache = Cache(backend)
    reader = Pipeline(program, reader_cache)
    program.signature = Typed
    with dspy.context(lm=lm):
        stored = await writer("q")
        assert (await reader("q")).answer == stored.answer
    assert (lm.requests, reader_cache.stats.hits) == (1, 1)


async def test_an_entry_of_a_type_never_allowed_is_a_logged_miss(caplog: pytest.LogCaptureFixture) -> None:
    async def point(question: str) -> Any:
        return Point(x=1, when=datetime.date(2026, 12, 3))

    backend = MemoryBackend()
    await Pipeline(point, Cache(backend, types=[Point]))("q")
    cache = Cache(backend, name="c")
    pipeline = Pipeline(point, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        await pipeline("q")
    key = cache.key_for("q")
    error = UnknownTypeError(f"{HERE}.Point")
    assert [r.getMessage() for r in caplog.records] == [
        f"c: unreadable entry {key} ({error}); treated as a miss",
        f"c: answer not cached: cannot cache a {HERE}.Point: not a type of the program's signatures "
        "(allow it with types=)",
    ]
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)


async def test_each_unencodable_kind_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    async def program(question: str) -> Any:
        if question == "point":
            return Point(x=1, when=datetime.date(2026, 12, 3))
        if question == "model":
            return Unserializable(x=1)
        if question == "wrapped":
            return dspy.Prediction(answer=Unserializable(x=2))
        return Opaque()

    cache = Cache(name="c", types=[Unserializable])
    pipeline = Pipeline(program, cache)
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        for question in ("point", "opaque", "model", "wrapped") * 2:
            await pipeline(question)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[:2] == [
        f"c: answer not cached: cannot cache a {HERE}.Point: not a type of the program's signatures "
        "(allow it with types=)",
        f"c: answer not cached: cannot cache a {HERE}.Opaque: no safe encoding for this type",
    ]
    assert len(messages) == 4
    assert messages[2].startswith("c: answer not cached: PydanticSerializationError(")
    assert messages[3].startswith("c: answer not cached: PydanticSerializationError(")
    assert "cannot serialise x" in messages[2]
    assert cache.stats.stores == 0


def test_at_most_256_reported_topics_are_remembered(caplog: pytest.LogCaptureFixture) -> None:
    cache = Cache()
    with caplog.at_level(logging.WARNING, logger="resilient_dspy.cache"):
        for i in range(300):
            cache._report_once(f"t{i}", "topic %s", i)
        cache._report_once("t0", "topic %s", 0)
        cache._report_once("t299", "topic %s", 299)
    assert len(cache._reported) == 256
    assert [r.getMessage() for r in caplog.records][-1] == "topic 299"
    assert len(caplog.records) == 301


async def test_answers_of_a_callable_object_and_a_nested_typed_pipeline_are_stored() -> None:
    class Service:
        def __init__(self) -> None:
            self.calls = 0

        async def __call__(self, question: str) -> Point:
            self.calls += 1
            return Point(x=self.calls, when=datetime.date(2026, 12, 3))

    service = Service()
    pipeline = Pipeline(service, Cache())
    assert (await pipeline("q")).x == 1
    assert (await pipeline("q")).x == 1

    lm = verdict_lm()
    nested = Pipeline(Pipeline(dspy.Predict(Typed)), cache := Cache())
    with dspy.context(lm=lm):
        first = await nested("q")
        assert (await nested("q")).answer == first.answer
    assert (lm.requests, cache.stats.stores) == (1, 1)
