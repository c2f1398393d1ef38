"""The program part of the cache key in a long-running process: found once, re-checked cheaply, never re-walked.

DSPy appends every LM call to ``history`` on the LM and on each calling module (up to 10,000 entries), and
``Module.named_predictors()`` walks those lists. So the key must give an aged program the key of a fresh one
without reading its history, and must still notice every change an optimizer or a user makes after the pipeline
was built: demos, instructions, signature, config, a predictor replaced or added, a sub-module frozen. The
reference key below is the key as it was always computed (DSPy's ``named_predictors()`` read afresh per call).
"""

from __future__ import annotations

import hashlib
from typing import Any

import dspy
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from resilient_dspy import Pipeline, Retry
from resilient_dspy.middleware.cache import Cache
from resilient_dspy.middleware.cache.keys import (
    KEY_VERSION,
    _adapter_identity,
    _canonical,
    _digest,
    _dumps,
    _is_secret,
    _lm_identity,
    _signature_identity,
    _type_name,
)
from resilient_dspy.testing import FaultInjectingLM

AGED = 10_000


class Untouchable(list[Any]):
    """A history that fails the test when anything iterates or indexes it (appending and popping are fine)."""

    def __iter__(self) -> Any:
        raise AssertionError("the history was walked")

    def __getitem__(self, index: Any) -> Any:
        raise AssertionError("the history was read")


class Steps(dspy.Module):  # type: ignore[misc]
    """A program with predictors as an attribute, in a list, in a dict and inside a sub-module."""

    def __init__(self) -> None:
        super().__init__()
        self.first = dspy.Predict("question -> draft")
        self.steps = [dspy.Predict("draft -> critique"), dspy.Predict("critique -> answer")]
        self.by_name = {"polish": dspy.Predict("answer -> polished")}
        self.think = dspy.ChainOfThought("question -> answer")
        self.note: Any = None

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.think.acall(question=question)


def every_predictor(program: dspy.Module) -> list[tuple[str, Any]]:
    """DSPy's named_predictors() read afresh, compiled sub-modules searched too (they run, so they are keyed)."""
    frozen = [m for _, m in program.named_sub_modules() if m is not program and getattr(m, "_compiled", False)]
    for module in frozen:
        module._compiled = False
    try:
        return list(program.named_predictors())
    finally:
        for module in frozen:
            module._compiled = True


def reference_key(program: dspy.Module, inputs: dict[str, Any], namespace: str = "default") -> str:
    """The key as computed before it was memoised: every predictor read afresh."""
    settings_lm = dspy.settings.lm
    predictors = []
    for name, predictor in every_predictor(program):
        signature = predictor.signature
        config = getattr(predictor, "config", None)
        lm = getattr(predictor, "lm", None) or settings_lm
        predictors.append(
            [
                name,
                _signature_identity(signature, signature.__doc__),
                _canonical(list(predictor.demos)),
                _canonical({k: v for k, v in config.items() if not _is_secret(k)}) if config else None,
                _canonical(getattr(predictor, "fields", None) or None),
                None if lm is None else _digest(_lm_identity(lm)),
            ]
        )
    identity = ["module", _type_name(type(program)), predictors, _adapter_identity(dspy.settings.adapter)]
    text = _dumps([KEY_VERSION, identity, _canonical(inputs)])
    return f"{namespace}:{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()}"


def keyed(program: Any) -> Cache:
    cache = Cache()
    Pipeline(program, cache)
    return cache


def modules_of(program: dspy.Module) -> list[Any]:
    return [module for _, module in program.named_sub_modules()]


def age(program: dspy.Module, lm: Any, entries: int = AGED) -> None:
    """Fill every module's and the LM's history the way DSPy does (one dict per LM call)."""
    owners = [*modules_of(program), lm]
    for i in range(entries):
        entry = {"prompt": f"p{i}", "response": None, "uuid": str(i)}
        for owner in owners:
            owner.history.append(entry)


def untouchable_history(program: dspy.Module) -> None:
    for module in modules_of(program):
        module.history = Untouchable()


# ----------------------------------------------------------------------------------------------- aged programs


@pytest.mark.parametrize("make", [lambda: dspy.Predict("question -> answer"), dspy.ChainOfThought, Steps])
def test_an_aged_program_has_the_key_of_a_fresh_one(make: Any) -> None:
    build = (lambda: make("question -> answer")) if make is dspy.ChainOfThought else make
    fresh, aged = build(), build()
    lm = FaultInjectingLM()
    fresh_cache, aged_cache = keyed(fresh), keyed(aged)
    with dspy.context(lm=lm):
        before = aged_cache.key_for("q")
        age(aged, lm)
        assert aged_cache.key_for("q") == before == fresh_cache.key_for("q") == reference_key(fresh, {"question": "q"})
        assert keyed(aged).key_for("q") == before


async def test_keys_never_walk_the_history_on_a_hit_a_miss_or_a_bypass() -> None:
    """Every module's history is a list that fails when read: the calls still key, hit, miss and bypass."""
    program = Steps()
    untouchable_history(program)
    cache = Cache()
    pipeline = Pipeline(program, Retry(2), cache)
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        first = await pipeline("q")
        again = await pipeline("q")
        bypassed = await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
        key = cache.key_for("q")
    assert first.answer == again.answer == bypassed.answer
    assert (cache.stats.misses, cache.stats.hits, cache.stats.bypassed) == (1, 1, 1)
    assert lm.requests == 2
    fresh = Steps()
    with dspy.context(lm=lm):
        assert key == reference_key(fresh, {"question": "q"})


async def test_no_call_walks_the_program_with_named_predictors(monkeypatch: pytest.MonkeyPatch) -> None:
    """After the pipeline is built, hits, misses and bypassed calls never call named_predictors()/predictors()."""
    program = dspy.ChainOfThought("question -> answer")
    cache = Cache()
    pipeline = Pipeline(program, Retry(2), cache)
    walks: list[str] = []
    real = dspy.Module.named_predictors

    def counting(self: Any) -> Any:
        walks.append(type(self).__name__)
        return real(self)

    monkeypatch.setattr(dspy.Module, "named_predictors", counting)
    with dspy.context(lm=FaultInjectingLM()):
        await pipeline("q")
        await pipeline("q")
        await pipeline("r")
        await pipeline.run(pipeline.new_call({"question": "q"}, bypass_cache=True))
        cache.key_for("q")
    assert walks == []


# --------------------------------------------------------------------------------------- changes after build


def test_structural_changes_after_build_give_new_keys() -> None:
    """A predictor replaced, added to a list or dict, or set on a new attribute; a sub-module frozen keeps its key."""
    program = Steps()
    cache = keyed(program)
    lm = FaultInjectingLM()
    seen: list[str] = []

    def check() -> None:
        key = cache.key_for("q")
        assert key == reference_key(program, {"question": "q"})
        seen.append(key)

    with dspy.context(lm=lm):
        check()
        program.first = dspy.Predict("question -> draft, notes")
        check()
        program.steps.append(dspy.Predict("answer -> summary"))
        check()
        program.steps[0] = dspy.Predict("draft -> critique, score")
        check()
        program.by_name["shorten"] = dspy.Predict("answer -> short")
        check()
        program.note = dspy.Predict("answer -> note")
        check()
        before = seen[-1]
        program.think._compiled = True  # frozen by an optimizer: its predictors still run, so the key stays
        assert cache.key_for("q") == before == reference_key(program, {"question": "q"})
        program.think._compiled = False
        program.extra = dspy.Predict("question -> extra")
        check()
        del program.extra
        assert cache.key_for("q") == before
    assert len(set(seen)) == len(seen)


def test_in_place_edits_of_a_predictor_after_build_give_new_keys() -> None:
    program = Steps()
    predictor = program.think.predict
    cache = keyed(program)
    seen: list[str] = []
    with dspy.context(lm=FaultInjectingLM()):

        def check() -> None:
            key = cache.key_for("q")
            assert key == reference_key(program, {"question": "q"})
            seen.append(key)

        check()
        predictor.demos.append(dspy.Example(question="1+1?", reasoning="sum", answer="2"))
        check()
        predictor.demos[0] = dspy.Example(question="1+1?", reasoning="sum", answer="two")
        check()
        predictor.signature.instructions = "Answer tersely."
        check()
        predictor.signature = predictor.signature.with_instructions("Answer at length.")
        check()
        predictor.config["temperature"] = 0.3
        check()
        predictor.fields["answer"] = {"criteria": "one word"}
        check()
        predictor.lm = FaultInjectingLM("fault/pinned")
        check()
        predictor.lm.kwargs["temperature"] = 0.9
        check()
    assert len(set(seen)) == len(seen)


def test_a_demo_edited_inside_is_noticed_once_it_is_replaced() -> None:
    """Lists are compared item by item by identity: the documented remedy for an edit inside a demo object."""
    program = dspy.Predict("question -> answer")
    program.demos = [dspy.Example(question="1+1?", answer="2")]
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        before = cache.key_for("q")
        program.demos[0]["answer"] = "two"
        program.demos[0] = program.demos[0].copy()
        after = cache.key_for("q")
        assert after == reference_key(program, {"question": "q"})
    assert after != before


class Hidden(dspy.Module):  # type: ignore[misc]
    """Exposes a predictor kept where DSPy's walk would not find it, through its own named_predictors()."""

    def __init__(self) -> None:
        super().__init__()
        self._inner = {"kept": (dspy.Predict("question -> answer"),)}

    def named_predictors(self) -> list[tuple[str, Any]]:
        return [("inner", self._inner["kept"][0])]

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self._inner["kept"][0].acall(question=question)


class Wrapper(dspy.Module):  # type: ignore[misc]
    """A sub-module with its own named_parameters() walk inside an ordinary program."""

    def __init__(self) -> None:
        super().__init__()
        self.hidden = HiddenParameters()

    async def aforward(self, question: str) -> dspy.Prediction:
        return await self.hidden.named_parameters()[0][1].acall(question=question)


class HiddenParameters(dspy.Module):  # type: ignore[misc]
    def __init__(self) -> None:
        super().__init__()
        self._kept = [dspy.Predict("question -> answer")]

    def named_parameters(self) -> list[tuple[str, Any]]:
        return [("kept", self._kept[0])]


@pytest.mark.parametrize("make", [Hidden, Wrapper])
def test_a_class_with_its_own_walk_is_keyed_by_it_and_its_predictors_are_re_checked(make: Any) -> None:
    program = make()
    predictor = program.named_predictors()[0][1]
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        before = cache.key_for("q")
        assert before == reference_key(program, {"question": "q"})
        predictor.demos.append(dspy.Example(question="1+1?", answer="2"))
        after = cache.key_for("q")
        assert after == reference_key(program, {"question": "q"})
    assert after != before


# ------------------------------------------------------------------------------------------------ optimizers


TRAINSET = [
    dspy.Example(question="1+1?", answer="2").with_inputs("question"),
    dspy.Example(question="2+2?", answer="4").with_inputs("question"),
]


async def test_a_program_compiled_in_place_after_build_gets_new_keys_and_is_not_served_stale() -> None:
    """LabeledFewShot compiles a copy; loading its state into the wrapped program (in place) changes the key."""
    program = dspy.ChainOfThought("question -> answer")
    cache = Cache()
    pipeline = Pipeline(program, cache)
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await pipeline("q")
        before = cache.key_for("q")
        compiled = dspy.LabeledFewShot(k=2).compile(program, trainset=TRAINSET)
        assert cache.key_for("q") == before  # compile() changed a copy, not the wrapped program
        program.load_state(compiled.dump_state())
        after = cache.key_for("q")
        assert after == reference_key(program, {"question": "q"})
        await pipeline("q")
    assert after != before
    assert lm.requests == 2
    assert cache.stats.hits == 0


def test_a_compiled_predictor_assigned_into_the_program_after_build_gets_new_keys() -> None:
    program = Steps()
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        before = cache.key_for("q")
        program.first = dspy.LabeledFewShot(k=1).compile(program.first, trainset=TRAINSET)
        after = cache.key_for("q")
        assert after == reference_key(program, {"question": "q"})
    assert after != before


# ------------------------------------------------------------------------------------------ property test


def _demo(i: int) -> dspy.Example:
    return dspy.Example(question=f"{i}?", draft=f"d{i}")


EDITS = {
    "append_demo": lambda p, i: p.first.demos.append(_demo(i)),
    "replace_demo": lambda p, i: p.first.demos.__setitem__(0, _demo(i)) if p.first.demos else None,
    "reassign_demos": lambda p, i: setattr(p.first, "demos", [_demo(i)]),
    "instructions": lambda p, i: setattr(p.steps[0].signature, "instructions", f"Do {i}."),
    "signature": lambda p, i: setattr(p.first, "signature", p.first.signature.with_instructions(f"S{i}")),
    "config": lambda p, i: p.first.config.__setitem__("temperature", i / 10),
    "replace_step": lambda p, i: p.steps.__setitem__(0, dspy.Predict(f"draft -> critique{i}")),
    "add_step": lambda p, i: p.steps.append(dspy.Predict(f"answer -> s{i}")),
    "pin_lm": lambda p, i: setattr(p.first, "lm", FaultInjectingLM(f"fault/{i}")),
    "unpin_lm": lambda p, i: setattr(p.first, "lm", None),
    "note": lambda p, i: setattr(p, "note", dspy.Predict(f"answer -> note{i}") if i % 2 else None),
    "freeze": lambda p, i: setattr(p.think, "_compiled", bool(i % 2)),
    "history": lambda p, i: [m.history.append({"i": i}) for m in modules_of(p)],
    "nothing": lambda p, i: None,
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(sorted(EDITS)), st.integers(0, 5)), max_size=12))
def test_the_memoised_key_always_equals_the_key_read_afresh(edits: list[tuple[str, int]]) -> None:
    """Whatever is changed after build, and in whatever order, the key never differs from a fresh reading."""
    program = Steps()
    cache = keyed(program)
    with dspy.context(lm=FaultInjectingLM()):
        assert cache.key_for("q") == reference_key(program, {"question": "q"})
        for name, i in edits:
            EDITS[name](program, i)
            assert cache.key_for("q") == reference_key(program, {"question": "q"}), name


async def test_two_compiled_sub_modules_assigned_in_turn_give_different_keys_and_no_stale_answer() -> None:
    """DSPy's named_predictors() leaves compiled sub-modules out (for optimizers); the key must not: they run."""
    program = Steps()
    cache = Cache()
    pipeline = Pipeline(program, cache)
    lm = FaultInjectingLM()
    one = dspy.LabeledFewShot(k=1).compile(dspy.ChainOfThought("question -> answer"), trainset=TRAINSET[:1])
    two = dspy.LabeledFewShot(k=1).compile(dspy.ChainOfThought("question -> answer"), trainset=TRAINSET[1:])
    one._compiled = two._compiled = True  # as BootstrapFewShot and most optimizers mark what they return
    with dspy.context(lm=lm):
        program.think = one
        first = cache.key_for("q")
        await pipeline("q")
        program.think = two
        assert cache.key_for("q") != first
        await pipeline("q")
    assert lm.requests == 2
    assert cache.stats.hits == 0
