"""A program's shape: its input fields and their rules, its output fields, its named predictors, the cheap check that
they still hold, and what a target is made of for cache keys (:class:`KeyIdentity`)."""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import dspy
from dspy.predict.parameter import Parameter
from dspy.predict.predict import Predict
from dspy.primitives.base_module import BaseModule

__all__ = [
    "InputRule",
    "KeyIdentity",
    "NestedIdentity",
    "ProgramShape",
    "answer_annotations_of",
    "find_predictors",
    "identity_source",
    "qualified_name",
]


def _signature_inputs(signature: Any) -> tuple[str, ...]:
    fields = getattr(signature, "input_fields", None)
    return tuple(fields) if fields else ()


_DSPY_CALL_OPTIONS = frozenset({"config", "lm", "demos", "signature", "prediction"})
"""Keywords ``dspy.Predict`` takes besides its signature's fields (per-call LM config, LM, demos, ...)."""


class InputRule:
    """Which input names a program takes: ``required`` ones must be given, and none beyond ``accepted`` (None: any)."""

    __slots__ = ("accepted", "owner", "required", "shown")

    def __init__(
        self, owner: str, required: Iterable[str], accepted: Iterable[str] | None, shown: Iterable[str] | None = None
    ) -> None:
        self.owner = owner
        self.required = frozenset(required)
        self.accepted = None if accepted is None else frozenset(accepted)
        self.shown = sorted(self.accepted or ()) if shown is None else list(shown)  # the inputs a message names

    def problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        found = [
            (name, f"is not an input of {self.owner} (its inputs: {', '.join(self.shown) or 'none'})")
            for name in inputs
            if self.accepted is not None and name not in self.accepted
        ]
        found += [
            (name, f"is required by {self.owner} and was not given")
            for name in sorted(self.required)
            if name not in inputs
        ]
        return found


def _signature_rule(owner: str, signature: Any) -> InputRule:
    """DSPy's own rule: a field with a default, or whose annotation allows None, may be left out."""
    fields = signature.input_fields
    required = [
        name
        for name, info in fields.items()
        if info.is_required() and not _annotation_allows_none(getattr(info, "annotation", None))
    ]
    return InputRule(owner, required, (*fields, *_DSPY_CALL_OPTIONS), shown=list(fields))


def _annotation_allows_none(annotation: Any) -> bool:
    try:
        from dspy.adapters.utils import annotation_allows_none
    except ImportError:  # pragma: no cover - a DSPy that moved it: every field is then required unless defaulted
        return False
    return bool(annotation_allows_none(annotation))


def _parameters_rule(owner: str, parameters: Iterable[inspect.Parameter]) -> InputRule:
    """A function's rule: parameters without a default are required; ``**kwargs`` accepts any other name."""
    named = [p for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters)
    return InputRule(
        owner,
        [p.name for p in named if p.default is p.empty],
        None if takes_any else [p.name for p in named],
    )


def _module_inputs(program: dspy.Module) -> tuple[tuple[str, ...], InputRule]:
    """The module's input fields (for positionals) and its rule for input names."""
    owner = type(program).__name__
    signature = getattr(program, "signature", None)
    own = _signature_inputs(signature)
    if own:
        return own, _signature_rule(owner, signature)
    method = getattr(type(program), "forward", None) or getattr(type(program), "aforward", None)
    all_parameters = [
        p for p in (inspect.signature(method).parameters.values() if method is not None else ()) if p.name != "self"
    ]
    parameters = [p for p in all_parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if parameters:
        return tuple(p.name for p in parameters), _parameters_rule(owner, all_parameters)
    predictors = [predictor for _, predictor in find_predictors(program)[0]]
    for predictor in predictors:
        found = _signature_inputs(predictor.signature)
        if found:
            if len(predictors) == 1 and any(p.kind is p.VAR_KEYWORD for p in all_parameters):
                # forward(**kwargs) around its one predictor (ChainOfThought, BestOfN(Predict)): it takes its inputs
                return found, _signature_rule(owner, predictor.signature)
            return found, _parameters_rule(owner, all_parameters)  # several predictors: forward's own parameters
    return (), _parameters_rule(owner, all_parameters)


def _module_outputs(program: dspy.Module) -> tuple[str, ...] | None:
    """The output fields every answer of ``program`` has, when certain: its own signature's (``Predict``, ``ReAct``),
    a ``ChainOfThought``'s without the ``reasoning`` it adds; None for a custom module (its forward decides)."""
    own = getattr(program, "signature", None)
    if own is not None and getattr(own, "output_fields", None):
        return tuple(own.output_fields)
    if isinstance(program, dspy.ChainOfThought):
        predict = getattr(program, "predict", None)
        fields = getattr(getattr(predict, "signature", None), "output_fields", None)
        if fields:
            return tuple(name for name in fields if name != "reasoning")
    return None


def _is_call_log(name: str, value: Any) -> bool:
    """DSPy's ``history``: a list of LM call records (up to 10,000), never holding a predictor."""
    return name == "history" and isinstance(value, list)


def _parameters(module: Any, owners: list[Any]) -> list[tuple[str, Any]]:
    """``module.named_parameters()``, same names and order, without reading ``history`` and with the parameters of
    compiled sub-modules too (they run, so they decide the answer); adds to ``owners`` every object whose
    attributes decide it (the module, sub-modules, parameters)."""
    owners.append(module)
    if type(module).named_parameters is not BaseModule.named_parameters:  # its own walk: used as it is
        found = list(module.named_parameters())
        owners.extend(value for _, value in found)
        return found
    visited: set[int] = set()
    found = []

    def add(name: str, value: Any) -> None:
        if isinstance(value, Parameter):
            if id(value) not in visited:
                visited.add(id(value))
                found.append((name, value))
                owners.append(value)
        elif isinstance(value, dspy.Module):
            # a compiled (frozen) sub-module too: DSPy's walk hides it from optimizers, but its predictors run
            for sub_name, param in _parameters(value, owners):
                add(f"{name}.{sub_name}", param)

    if isinstance(module, Parameter):
        add("self", module)
    for name, value in module.__dict__.items():
        if isinstance(value, list | tuple):
            if not _is_call_log(name, value):
                for index, item in enumerate(value):
                    add(f"{name}[{index}]", item)
        elif isinstance(value, dict):
            for key, item in value.items():
                add(f"{name}['{key}']", item)
        else:
            add(name, value)
    return found


def find_predictors(program: dspy.Module) -> tuple[list[tuple[str, Any]], list[Any]]:
    """Every predictor that runs in ``program`` — ``program.named_predictors()`` (same names, same order) plus
    those of compiled sub-modules, which DSPy's walk leaves out for optimizers — without walking any ``history``,
    and the objects whose attributes decide that list and each predictor's identity. A class's own
    ``named_predictors`` is used."""
    owners: list[Any] = []
    if type(program).named_predictors is not dspy.Module.named_predictors:
        found = list(program.named_predictors())
        return found, [program, *(predictor for _, predictor in found)]
    found = [(name, param) for name, param in _parameters(program, owners) if isinstance(param, Predict)]
    return found, list({id(owner): owner for owner in owners}.values())


# one comparison: a live view (an object's attribute values, a dict's values, a list) and the values it held,
# compared by identity; for a dict, its live keys and the keys it held, compared by ==
_Check = tuple[Any, tuple[Any, ...], Any, tuple[Any, ...]]


class ProgramShape:
    """The named predictors of a module, found once, and what must stay the same for them and their identity
    (signature, instructions, demos, config, lm) to hold; :meth:`holds` re-checks that without any walk.

    Compared, by identity: the attributes of the program, of each sub-module and each predictor, and the items
    of their lists and dicts one level deep (a demo replaced is seen, a demo object edited in place is not);
    each signature's instructions. DSPy's ``history`` lists are left out.
    """

    __slots__ = ("_checks", "_dicts", "_instructions", "predictors")

    def __init__(self, program: dspy.Module) -> None:
        found, owners = find_predictors(program)
        self.predictors: tuple[tuple[str, Any], ...] = tuple(found)
        owners = [owner for owner in owners if isinstance(getattr(owner, "__dict__", None), dict)]
        self._dicts = tuple((owner, owner.__dict__) for owner in owners)
        checks: list[_Check] = []
        for owner in owners:
            state = owner.__dict__
            checks.append((state.values(), tuple(state.values()), state.keys(), tuple(state)))
            for name, value in state.items():
                if isinstance(value, dict):
                    checks.append((value.values(), tuple(value.values()), value.keys(), tuple(value)))
                elif isinstance(value, list) and not _is_call_log(name, value):  # a tuple cannot change
                    checks.append((value, tuple(value), None, ()))
        self._checks = tuple(checks)
        signatures = [getattr(predictor, "signature", None) for _, predictor in found]
        self._instructions = tuple((s, s.__doc__) for s in signatures if s is not None)

    def holds(self) -> bool:
        """True while nothing compared changed: no attribute set, added or deleted, no list or dict item changed."""
        is_, eq = operator.is_, operator.eq
        try:
            for owner, state in self._dicts:
                if owner.__dict__ is not state:
                    return False
            for live, values, keys, names in self._checks:
                if len(live) != len(values):
                    return False
                if values and not (all(map(is_, live, values)) and (keys is None or all(map(eq, keys, names)))):
                    return False
            for signature, doc in self._instructions:
                if signature.__doc__ is not doc:
                    return False
        except Exception:  # an odd attribute (a key whose == raises): treat the program as changed
            return False
        return True


@dataclass(frozen=True, slots=True, eq=False)
class KeyIdentity:
    """What decides a target's answers besides its inputs: the parts a cache key is made of.

    A target says what it is made of; the cache encodes it (canonical JSON, LM digests, never a secret). A target
    hands back the same object while these parts hold, so the cache encodes them again only for a new object.
    """

    kind: str
    """The key's tag for this kind of program: ``"module"``, ``"lm"``, ``"function"``, ``"pipeline"``, ``"target"``."""
    names: tuple[str, ...] = ()
    """What names the program: a module's class or a function, as ``"module.qualname"`` (:func:`qualified_name`)."""
    predictors: tuple[tuple[str, Any], ...] | None = None
    """A module's named predictors, each keyed by its signature, demos, config and LM (its own, else the one in
    effect); None for a program without predictors, which is keyed by the one LM in effect."""
    lm: Any = None
    """The LM every call goes to when the target fixes it (a wrapped ``dspy.LM``); None: the LM in ``dspy.settings``."""
    adapter: bool = True
    """Its answers go through the adapter in ``dspy.settings`` (every program but a bare LM)."""
    inner: KeyIdentity | None = None
    """The identity of the target this one runs (a nested pipeline); then only ``kind`` and ``inner`` count."""

    def needs_settings_lm(self) -> bool:
        """True when a predictor takes its LM from ``dspy.settings``: outside an LM context no call has this key."""
        if self.inner is not None:
            return self.inner.needs_settings_lm()
        return self.predictors is not None and any(getattr(p, "lm", None) is None for _, p in self.predictors)


def qualified_name(thing: Any) -> str:
    """``"module.qualname"`` of a class or function (``"?"`` for a missing module); else of its type."""
    qualname = getattr(thing, "__qualname__", None)
    if isinstance(qualname, str):
        return f"{getattr(thing, '__module__', '?')}.{qualname}"
    kind = type(thing)
    return f"{kind.__module__}.{kind.__qualname__}"


def identity_source(target: Any) -> Callable[[], KeyIdentity]:
    """What to call for ``target``'s :class:`KeyIdentity` now: its ``key_identity`` (every target of the library
    has one); a target of one's own without it is known by its class and name."""
    own = getattr(target, "key_identity", None)
    if callable(own):
        return own  # type: ignore[no-any-return]
    fixed = KeyIdentity("target", (qualified_name(type(target)), target.name))
    return lambda: fixed


def answer_annotations_of(target: Any) -> tuple[Any, ...]:
    """``target.answer_annotations()``, or none for a target of one's own without it."""
    own = getattr(target, "answer_annotations", None)
    return tuple(own()) if callable(own) else ()


class NestedIdentity:
    """The identity of a nested pipeline: its inner target's, wrapped once per inner identity (same object while
    that holds, as :class:`KeyIdentity` promises)."""

    __slots__ = ("_inner", "_wrapped")

    def __init__(self, inner: Callable[[], KeyIdentity]) -> None:
        self._inner = inner
        self._wrapped: KeyIdentity | None = None

    def __call__(self) -> KeyIdentity:
        inner = self._inner()
        wrapped = self._wrapped
        if wrapped is None or wrapped.inner is not inner:
            wrapped = self._wrapped = KeyIdentity("pipeline", inner=inner)
        return wrapped
