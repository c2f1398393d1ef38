"""Adapters that turn what a pipeline wraps into its terminal handler.

A ``dspy.Module`` is called with ``acall`` (never ``aforward``, which skips usage tracking), or, when it defines only
a sync ``forward``, in a worker thread (``dspy.asyncify``, settings carried over); a ``dspy.LM``
with ``acall(prompt=...)``, a :class:`~resilient_dspy.Pipeline` with the parent's deadline, and any
``async def`` with its parameters as inputs. Each adapter knows its input fields, so a positional
argument maps to the first one.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
import warnings
import weakref
from collections.abc import Coroutine, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import dspy
from dspy.predict.parameter import Parameter
from dspy.predict.predict import Predict
from dspy.primitives.base_module import BaseModule

from resilient_dspy.errors import ResilienceWarning

if TYPE_CHECKING:
    from resilient_dspy.core.call import Call
    from resilient_dspy.core.pipeline import Pipeline

__all__ = [
    "ProgramShape",
    "Target",
    "UsageScope",
    "adapt_program",
    "attach_usage",
    "find_predictors",
    "lm_identity",
    "no_dspy_retries",
    "setting",
    "usage_scope",
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


def no_dspy_retries(lm: dspy.LM) -> dspy.LM:
    """A copy of ``lm`` with DSPy's own retries off, for use under a :class:`~resilient_dspy.Retry`."""
    return lm.copy(num_retries=0)


try:  # DSPy's own settings store, read directly: ``dspy.settings.<name>`` costs an AttributeError round trip
    from dspy.dsp.utils.settings import main_thread_config as _MAIN_CONFIG
    from dspy.dsp.utils.settings import thread_local_overrides as _OVERRIDES
    from dspy.dsp.utils.utils import dotdict as _dotdict
    from dspy.utils.usage_tracker import UsageTracker as _UsageTracker
except ImportError:  # pragma: no cover - a DSPy that moved these; fall back to its public API
    _OVERRIDES = None


def setting(name: str) -> Any:
    """``dspy.settings.<name>`` in the current context, or None when unset; ~10x cheaper than the attribute."""
    if _OVERRIDES is None:  # pragma: no cover
        return getattr(dspy.settings, name, None)
    overrides = _OVERRIDES.get()
    if name in overrides:
        return overrides[name]
    return _MAIN_CONFIG.get(name)


_ENDPOINT_KEYS = ("api_base", "base_url")
DEPLOYMENT_KEYS = frozenset({*_ENDPOINT_KEYS, "deployment_id"})
"""The LM kwargs that say which deployment answers; :func:`lm_identity` reads them."""


def lm_identity(lm: Any) -> str | None:
    """Which deployment answers an LM's requests: its model, ``@`` its endpoint when it has one, ``#`` its
    deployment id when given. Cache keys and per-model partitions (:func:`~resilient_dspy.by_model`) both use it,
    so a backup deployment of the same model is another circuit and another cache entry.
    """
    if lm is None:
        return None
    identity = str(getattr(lm, "model", None) or type(lm).__name__)
    kwargs = getattr(lm, "kwargs", None)
    kwargs = kwargs if isinstance(kwargs, dict) else {}
    endpoints = []
    for name in _ENDPOINT_KEYS:
        for endpoint in (getattr(lm, name, None), kwargs.get(name)):
            if isinstance(endpoint, str) and endpoint and endpoint not in endpoints:
                endpoints.append(endpoint)
    if endpoints:
        identity += "@" + ",".join(endpoints)
    deployment = kwargs.get("deployment_id")
    if isinstance(deployment, str) and deployment:
        identity += f"#{deployment}"
    return identity


class UsageScope:
    """The LM usage recorded inside one :class:`usage_scope`: tokens by model, as DSPy's tracker sums them."""

    __slots__ = ("tracker",)

    def __init__(self, tracker: Any) -> None:
        self.tracker = tracker

    def by_model(self) -> dict[str, dict[str, Any]]:
        if not self.tracker.usage_data:
            return {}
        return dict(self.tracker.get_total_tokens())

    def total_tokens(self, by_model: dict[str, dict[str, Any]] | None = None) -> int:
        """Prompt + completion tokens of every LM response (DSPy cache hits excluded) in the scope."""
        total = 0
        for usage in (self.by_model() if by_model is None else by_model).values():
            value = usage.get("total_tokens")
            if not isinstance(value, int):
                value = (usage.get("prompt_tokens") or 0) + (usage.get("completion_tokens") or 0)
            total += int(value)
        return total


class usage_scope:
    """Record the LM usage of the code inside (per task: DSPy's tracker lives in a ContextVar).

    The same as ``with dspy.track_usage()``, which rolls the usage up into an enclosing tracker on exit, but
    it only adds the tracker to the context's overrides instead of snapshotting all of DSPy's settings: ~1 µs
    instead of ~9 µs and ~1 KB per in-flight call, and settings read inside stay exactly what they were outside.

    DSPy's ``Module.acall`` only attaches ``get_lm_usage()`` to its prediction when no tracker is active, so
    a layer that measures usage must hand it back: :func:`attach_usage` does that when the user tracks usage.
    """

    __slots__ = ("_fallback", "_parent", "_token", "_tracker")

    def __enter__(self) -> UsageScope:
        if _OVERRIDES is None:  # pragma: no cover
            self._fallback: Any = dspy.track_usage()
            return UsageScope(self._fallback.__enter__())
        self._fallback = None
        tracker = self._tracker = _UsageTracker()
        overrides = _OVERRIDES.get()
        self._parent = overrides["usage_tracker"] if "usage_tracker" in overrides else _MAIN_CONFIG.get("usage_tracker")
        inner = _dotdict(overrides)
        inner["usage_tracker"] = tracker
        self._token = _OVERRIDES.set(inner)
        return UsageScope(tracker)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: Any) -> None:
        if self._fallback is not None:  # pragma: no cover
            self._fallback.__exit__(kind, error, traceback)
            return
        _OVERRIDES.reset(self._token)
        parent = self._parent
        if parent is not None:
            for lm, entries in self._tracker.usage_data.items():
                parent.usage_data[lm].extend(entries)


def attach_usage(result: Any, scope: UsageScope) -> None:
    """Give ``result`` the usage DSPy would have attached had our scope not been active (``track_usage`` on)."""
    if isinstance(result, dspy.Prediction) and setting("track_usage") and result.get_lm_usage() is None:
        result.set_lm_usage(scope.by_model())


class _RetryWatch:
    """Warns once per LM instance whose ``num_retries`` would multiply with our Retry's attempts."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self.enabled = False
        self._seen: weakref.WeakSet[Any] = weakref.WeakSet()

    def check(self, lm: Any, stacklevel: int = 2) -> None:
        if not self.enabled or lm is None or lm in self._seen:
            return
        self._seen.add(lm)
        retries = getattr(lm, "num_retries", 0) or 0
        if retries > 0:
            warnings.warn(
                f"{self.owner}: LM {getattr(lm, 'model', lm)!r} has num_retries={retries}, so DSPy retries each "
                f"of our attempts {retries} more time(s) with its own unjittered sleeps. Build it with "
                "num_retries=0 or wrap it in resilient_dspy.no_dspy_retries(lm).",
                ResilienceWarning,
                stacklevel=stacklevel,
            )


def _signature_inputs(signature: Any) -> tuple[str, ...]:
    fields = getattr(signature, "input_fields", None)
    return tuple(fields) if fields else ()


_DSPY_CALL_OPTIONS = frozenset({"config", "lm", "demos", "signature", "prediction"})
"""Keywords ``dspy.Predict`` takes besides its signature's fields (per-call LM config, LM, demos, ...)."""


class InputRule:
    """Which input names a program takes: ``required`` ones must be given, and none beyond ``accepted`` (None: any)."""

    __slots__ = ("accepted", "owner", "required")

    def __init__(self, owner: str, required: Iterable[str], accepted: Iterable[str] | None) -> None:
        self.owner = owner
        self.required = frozenset(required)
        self.accepted = None if accepted is None else frozenset(accepted)

    def problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        found = [
            (name, f"is not an input of {self.owner} (it takes {sorted(self.accepted)})")
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
    return InputRule(owner, required, (*fields, *_DSPY_CALL_OPTIONS))


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


class ModuleTarget:
    """Runs a ``dspy.Module`` via ``acall``; on a cache-bypass attempt, with DSPy's response cache off.

    A module that defines only ``forward`` (the usual DSPy style) runs in a worker thread through ``dspy.asyncify``:
    DSPy's settings (the LM of ``dspy.context``, usage tracking) are carried into the thread, and at most
    ``dspy.settings.async_max_workers`` such calls (default 8) run at once.
    """

    def __init__(self, program: dspy.Module) -> None:
        self.program = program
        self.name = type(program).__name__
        self.input_fields, self._rule = _module_inputs(program)
        self.output_fields = _module_outputs(program)
        self._watch = _RetryWatch(self.name)
        self._threaded = getattr(type(program), "aforward", None) is None
        self._in_thread: Any = dspy.asyncify(program) if self._threaded else None
        self._shape: ProgramShape | None = None

    def shape(self) -> ProgramShape:
        """The program's predictors, found on first use and found again only after the program changed."""
        shape = self._shape
        if shape is None or not shape.holds():
            shape = self._shape = ProgramShape(self.program)
        return shape

    def named_predictors(self) -> tuple[tuple[str, Any], ...]:
        """``program.named_predictors()`` as it is now, without DSPy's walk of every ``history`` entry."""
        return self.shape().predictors

    def watch_dspy_retries(self) -> None:
        self._watch.enabled = True
        for _, predictor in self.named_predictors():
            self._watch.check(predictor.lm, stacklevel=5)

    def __call__(self, call: Call) -> Coroutine[Any, Any, Any]:
        # a plain def handing back the program's coroutine: one coroutine frame less per attempt
        call.record.attempts += 1
        if self._watch.enabled:
            self._watch.check(setting("lm"))
        if call.bypass_cache:
            return self._call_uncached(call.inputs)
        if self._in_thread is not None:
            return self._in_thread(**call.inputs)  # type: ignore[no-any-return]
        return self.program.acall(**call.inputs)  # type: ignore[no-any-return]

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        return self._rule.problems(inputs)

    async def _call_uncached(self, inputs: dict[str, Any]) -> Any:
        fresh = self.program.deepcopy()  # a copy drops its history (Module.__getstate__): walking it is cheap
        copies = find_predictors(fresh)[0]
        for (_, original), (_, copy) in zip(self.named_predictors(), copies, strict=True):
            if original.lm is not None:
                copy.lm = original.lm.copy(cache=False)
        with _uncached_settings_lm():
            if self._threaded:
                return await dspy.asyncify(fresh)(**inputs)
            return await fresh.acall(**inputs)

    def describe(self) -> dict[str, Any]:
        signatures = [str(p.signature.signature) for _, p in self.named_predictors()]
        return {"layer": "program", "target": self.name, "inputs": list(self.input_fields), "signatures": signatures}


@contextlib.contextmanager
def _uncached_settings_lm() -> Iterator[None]:
    lm = dspy.settings.lm
    if lm is None or not hasattr(lm, "copy"):
        yield
        return
    with dspy.context(lm=lm.copy(cache=False)):
        yield


class LMTarget:
    """Runs a ``dspy.LM`` (or any ``BaseLM``): inputs are ``prompt`` or ``messages`` plus call kwargs."""

    input_fields: tuple[str, ...] = ("prompt",)
    output_fields: tuple[str, ...] | None = None

    def __init__(self, lm: dspy.BaseLM) -> None:
        self.lm = lm
        self.name = f"LM({getattr(lm, 'model', type(lm).__name__)})"
        self._watch = _RetryWatch(self.name)

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
            return self.lm.acall(**call.inputs, cache=False)  # type: ignore[no-any-return]
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


class PipelineTarget:
    """Runs a nested :class:`~resilient_dspy.Pipeline`, handing down the caller's deadline."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.name = pipeline.name
        self.input_fields = pipeline.input_fields
        self.output_fields: tuple[str, ...] | None = getattr(pipeline.target, "output_fields", None)

    def watch_dspy_retries(self) -> None:
        self.pipeline.target.watch_dspy_retries()

    def input_problems(self, inputs: Mapping[str, Any]) -> list[tuple[str, str]]:
        return self.pipeline.target.input_problems(inputs)

    async def __call__(self, call: Call) -> Any:
        nested = self.pipeline.new_call(
            call.inputs,
            deadline=call.deadline,
            properties=call.properties,
            partition_key=call.partition_key,
            bypass_cache=call.bypass_cache,
        )
        try:
            return await self.pipeline.run(nested)
        finally:
            call.record.absorb(nested.record)

    def describe(self) -> dict[str, Any]:
        return {"layer": "program", "target": self.name, "pipeline": self.pipeline.describe()}


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


def adapt_program(program: Any, problems: list[tuple[str, str]]) -> Target | None:
    """The :class:`Target` for ``program``, or None with the reason appended to ``problems``."""
    from resilient_dspy.core.pipeline import Pipeline

    if isinstance(program, Pipeline):
        return PipelineTarget(program)
    if isinstance(program, dspy.Module):
        problem = _module_problem(program)
        if problem is not None:
            problems.append(("program", problem))
            return None
        return ModuleTarget(program)
    if isinstance(program, dspy.BaseLM):
        return LMTarget(program)
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
