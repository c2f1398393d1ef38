"""Adapters that turn what a pipeline wraps into its terminal handler.

A ``dspy.Module`` is called with ``acall`` (never ``aforward``, which skips usage tracking), or, when it defines only
a sync ``forward``, in a worker thread (:mod:`.threads`, settings carried over); a ``dspy.LM``
with ``acall(prompt=...)``, and any ``async def`` with its parameters as inputs (a nested
:class:`~resilient_dspy.Pipeline` is adapted in :mod:`resilient_dspy.core.pipeline`). Each adapter knows its input
fields, so a positional argument maps to the first one, and what its cache key is made of (``key_identity()``).
"""

from __future__ import annotations

import contextlib
import inspect
import typing
from collections.abc import Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import dspy

from resilient_dspy.binding.resample import RESAMPLE, Resample, other_adapter
from resilient_dspy.binding.settings import RetryWatch, setting
from resilient_dspy.binding.shape import (
    KeyIdentity,
    ProgramShape,
    _module_inputs,
    _module_outputs,
    _parameters_rule,
    find_predictors,
    qualified_name,
)
from resilient_dspy.binding.threads import ThreadSlots, run_in_thread
from resilient_dspy.binding.truncation import truncation_of

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call

__all__ = [
    "CallableTarget",
    "LMTarget",
    "ModuleTarget",
    "Target",
    "adapt_target",
]


class Target(Protocol):
    """The innermost handler of a pipeline: runs the wrapped program once."""

    name: str
    input_fields: tuple[str, ...]

    async def __call__(self, call: Call) -> Any: ...

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        """What is wrong with ``inputs`` (an unknown name, a required one missing), as ``(field, rule)``; [] if none."""
        ...

    def describe(self) -> dict[str, Any]: ...

    def watch_dspy_retries(self) -> None:
        """Warn (once per LM) when an LM this target uses retries on its own (``num_retries > 0``)."""
        ...

    def key_identity(self) -> KeyIdentity:
        """What decides this target's answers besides its inputs (for cache keys); the same object while that holds."""
        ...

    def answer_annotations(self) -> tuple[Any, ...]:
        """Every type annotation its answers may hold (signature fields, a return type): what a cache may decode."""
        ...


class ModuleTarget:
    """Runs a ``dspy.Module`` via ``acall``; on a cache-bypass attempt, with DSPy's response cache off (or the changed
    request of a :class:`~resilient_dspy.binding.resample.Resample`). A parse error of an answer cut at ``max_tokens``
    is raised as :class:`~resilient_dspy.errors.TruncatedOutputError` (:mod:`.truncation`).

    A module that defines only ``forward`` (the usual DSPy style) runs in a worker thread (:mod:`.threads`): DSPy's
    settings (the LM of ``dspy.context``, usage tracking) are carried into the thread, and at most
    ``dspy.settings.async_max_workers`` threads (default 8) run at once, a timed-out call's thread until it returns.
    """

    def __init__(self, program: dspy.Module) -> None:
        self.program = program
        self.name = type(program).__name__
        self.input_fields, self._rule = _module_inputs(program)
        self.output_fields = _module_outputs(program)
        self._watch = RetryWatch(self.name)
        self._threaded = getattr(type(program), "aforward", None) is None
        self._slots = ThreadSlots() if self._threaded else None
        self._shape: ProgramShape | None = None
        self._identity: tuple[type[Any], ProgramShape, KeyIdentity] | None = None

    def shape(self) -> ProgramShape:
        """The program's predictors, found on first use and found again only after the program changed."""
        shape = self._shape
        if shape is None or not shape.holds():
            shape = self._shape = ProgramShape(self.program)
        return shape

    def named_predictors(self) -> tuple[tuple[str, Any], ...]:
        """``program.named_predictors()`` as it is now, without DSPy's walk of every ``history`` entry."""
        return self.shape().predictors

    def key_identity(self) -> KeyIdentity:
        """The program's class and its predictors as they are now: a new identity only after the program changed."""
        shape = self.shape()
        cls = type(self.program)
        known = self._identity
        if known is None or known[1] is not shape or known[0] is not cls:
            known = self._identity = (cls, shape, KeyIdentity("module", (qualified_name(cls),), shape.predictors))
        return known[2]

    def answer_annotations(self) -> tuple[Any, ...]:
        return tuple(info.annotation for _, p in self.named_predictors() for info in p.signature.fields.values())

    def watch_dspy_retries(self) -> None:
        self._watch.enabled = True
        for _, predictor in self.named_predictors():
            self._watch.check(predictor.lm, stacklevel=5)

    def __call__(self, call: Call) -> Coroutine[Any, Any, Any]:
        call.record.attempts += 1
        if self._watch.enabled:
            self._watch.check(setting("lm"))
        if call.bypass_cache:
            return self._call_fresh(call.inputs, call.properties.get(RESAMPLE))
        return self._call(call.inputs)

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        return self._rule.problems(inputs)

    async def _call(self, inputs: dict[str, Any]) -> Any:
        try:
            if self._slots is not None:
                return await run_in_thread(self.program, inputs, self._slots)
            return await self.program.acall(**inputs)
        except dspy.AdapterParseError as error:
            cut = truncation_of(error, [setting("lm"), *(p.lm for _, p in self.named_predictors())])
            if cut is None:
                raise
            raise cut from error

    async def _call_fresh(self, inputs: dict[str, Any], resample: Resample | None) -> Any:
        """The program with DSPy's response cache off, or, under a :class:`Resample`, with its changed request."""
        fresh = self.program.deepcopy()  # a copy drops its history (Module.__getstate__): walking it is cheap
        copies = find_predictors(fresh)[0]
        used: list[Any] = []
        for (_, original), (_, copy) in zip(self.named_predictors(), copies, strict=True):
            if original.lm is not None:
                copy.lm = _fresh_lm(original.lm, resample)
                used.append(copy.lm)
        overrides: dict[str, Any] = {}
        lm = dspy.settings.lm
        if lm is not None and hasattr(lm, "copy"):
            overrides["lm"] = _fresh_lm(lm, resample)
            used.append(overrides["lm"])
        if resample is not None and resample.switch_adapter:
            overrides["adapter"] = other_adapter(dspy.settings.adapter)
        with dspy.context(**overrides) if overrides else contextlib.nullcontext():
            try:
                if self._slots is not None:
                    return await run_in_thread(fresh, inputs, self._slots)
                return await fresh.acall(**inputs)
            except dspy.AdapterParseError as error:
                cut = truncation_of(error, used)
                if cut is None:
                    raise
                raise cut from error

    def describe(self) -> dict[str, Any]:
        signatures = [str(p.signature.signature) for _, p in self.named_predictors()]
        return {"layer": "program", "target": self.name, "inputs": list(self.input_fields), "signatures": signatures}


def _fresh_lm(lm: Any, resample: Resample | None) -> Any:
    """A copy of ``lm`` for one attempt: uncached, or with the resample's changes (a fresh rollout_id misses the cache).

    A resample that changes nothing (no rollout id: Retry(resample=False)) still turns the cache off."""
    changes = resample.lm_changes(lm) if resample is not None else {}
    return lm.copy(**changes) if "rollout_id" in changes else lm.copy(cache=False, **changes)


class LMTarget:
    """Runs a ``dspy.LM`` (or any ``BaseLM``): inputs are ``prompt`` or ``messages`` plus call kwargs."""

    input_fields: tuple[str, ...] = ("prompt",)
    output_fields: tuple[str, ...] | None = None

    def __init__(self, lm: dspy.BaseLM) -> None:
        self.lm = lm
        self.name = f"LM({getattr(lm, 'model', type(lm).__name__)})"
        self._watch = RetryWatch(self.name)
        self._identity = KeyIdentity("lm", lm=lm, adapter=False)

    def key_identity(self) -> KeyIdentity:
        """The LM itself (its model, endpoint and kwargs are read by the cache on every call); no adapter."""
        return self._identity

    def answer_annotations(self) -> tuple[Any, ...]:
        return ()

    def watch_dspy_retries(self) -> None:
        self._watch.enabled = True
        self._watch.check(self.lm, stacklevel=5)

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        """``prompt`` or ``messages`` must be given; any other name is a call kwarg for the LM (temperature, ...)."""
        if "prompt" in inputs or "messages" in inputs:
            return []
        return [("prompt", f"{self.name} needs prompt= or messages= (got {sorted(inputs)})")]

    def __call__(self, call: Call) -> Coroutine[Any, Any, Any]:
        # a plain def handing back the LM's coroutine: one coroutine frame less per attempt
        call.record.attempts += 1
        if call.bypass_cache:
            resample = call.properties.get(RESAMPLE)
            changes = resample.lm_changes(self.lm) if resample is not None else {}
            if "rollout_id" not in changes:
                changes["cache"] = False
            return self.lm.acall(**call.inputs, **changes)  # type: ignore[no-any-return]
        return self.lm.acall(**call.inputs)  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name, "inputs": list(self.input_fields), "also": ["messages"]}


class CallableTarget:
    """Runs any ``async def``; its named parameters are the input fields."""

    def __init__(self, function: Any) -> None:
        self.function = function
        self.name = getattr(function, "__qualname__", None) or type(function).__name__
        parameters = inspect.signature(function).parameters.values()
        self.input_fields = tuple(
            p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
        )
        self._positional_only = tuple(p.name for p in parameters if p.kind is p.POSITIONAL_ONLY)
        self._rule = _parameters_rule(self.name, parameters)
        self.output_fields: tuple[str, ...] | None = None
        self._identity = KeyIdentity("function", (qualified_name(function),))

    def key_identity(self) -> KeyIdentity:
        """The function's qualified name (a callable object: its class), under the LM and adapter in effect."""
        return self._identity

    def answer_annotations(self) -> tuple[Any, ...]:
        """The function's return annotation, if it has one that resolves."""
        function = self.function
        try:
            hints = typing.get_type_hints(function if inspect.isroutine(function) else type(function).__call__)
        except Exception:
            return ()
        return (hints["return"],) if "return" in hints else ()

    def watch_dspy_retries(self) -> None:
        """A plain function's LMs are not visible to us; see the retry docs on ``num_retries``."""

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        return self._rule.problems(inputs)

    def __call__(self, call: Call) -> Coroutine[Any, Any, Any]:
        # a plain def handing back the function's coroutine: one coroutine frame less per attempt
        call.record.attempts += 1
        if not self._positional_only:
            return self.function(**call.inputs)  # type: ignore[no-any-return]
        inputs = dict(call.inputs)
        args = [inputs.pop(name) for name in self._positional_only if name in inputs]
        return self.function(*args, **inputs)  # type: ignore[no-any-return]

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name, "inputs": list(self.input_fields)}


def _is_async_callable(obj: Any) -> bool:
    return inspect.iscoroutinefunction(obj) or (callable(obj) and inspect.iscoroutinefunction(obj.__call__))


def _is_async_generator(obj: Any) -> bool:
    return inspect.isasyncgenfunction(obj) or (callable(obj) and inspect.isasyncgenfunction(obj.__call__))


def _module_problem(program: dspy.Module) -> str | None:
    """Why ``program`` cannot be run to one result, or None: it needs a ``forward`` or an ``aforward`` to call."""
    forward = getattr(type(program), "forward", None)
    aforward = getattr(type(program), "aforward", None)
    for name, method in (("aforward", aforward), ("forward", forward)):
        if method is not None and inspect.isasyncgenfunction(method):
            return (
                f"{type(program).__name__}.{name} is an async generator; a pipeline runs a program to one result "
                "(return a dspy.Prediction; stream with dspy.streamify outside the pipeline)"
            )
    if forward is None and aforward is None:
        return f"{type(program).__name__} defines neither forward() nor aforward(); a dspy.Module needs one of them"
    if aforward is None and forward is not None and inspect.iscoroutinefunction(forward):
        return (
            f"{type(program).__name__}.forward is async; name it aforward() (DSPy's acall runs aforward, "
            "and a sync forward() runs in a worker thread)"
        )
    return None


def is_dspy_program(candidate: Any) -> bool:
    """True for a DSPy module or LM: what a pipeline wraps, never one of its layers."""
    return isinstance(candidate, dspy.Module | dspy.BaseLM)


def is_layer(candidate: Any) -> bool:
    """True for a middleware instance: an object whose ``async __call__`` takes exactly ``(call, next)``."""
    if isinstance(candidate, type) or not _is_async_callable(candidate) or inspect.isfunction(candidate):
        return False
    try:
        names = list(inspect.signature(candidate.__call__).parameters)
    except (TypeError, ValueError):
        return False
    return names == ["call", "next"]


def adapt_target(program: Any, problems: list[tuple[str, str]]) -> Target | None:
    """The :class:`Target` for a DSPy ``program`` or an async callable, or None with the reason appended to
    ``problems``; a nested Pipeline is adapted by :func:`resilient_dspy.core.pipeline.adapt_program` first."""
    if isinstance(program, dspy.Module):
        problem = _module_problem(program)
        if problem is not None:
            problems.append(("program", problem))
            return None
        return ModuleTarget(program)
    if isinstance(program, dspy.BaseLM):
        return LMTarget(program)
    if is_layer(program):
        problems.append(
            (
                "program",
                f"is a middleware layer ({type(program).__name__}), not a program: the program comes first, "
                "then the layers, as in Pipeline(program, *layers)",
            )
        )
        return None
    if _is_async_callable(program) and not isinstance(program, type):
        return CallableTarget(program)
    if _is_async_generator(program) and not isinstance(program, type):
        problems.append(
            (
                "program",
                f"is an async generator function ({program!r:.80}); a pipeline runs a program to one result: "
                "make it an async def that returns",
            )
        )
        return None
    kind = "a sync function" if callable(program) else type(program).__name__
    problems.append(
        (
            "program",
            f"must be a dspy.Module, a dspy.LM, a Pipeline or an async callable (got {kind}: {program!r:.80})",
        )
    )
    return None
