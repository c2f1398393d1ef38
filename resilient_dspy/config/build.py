"""Building a pipeline from a :class:`~resilient_dspy.config.source.StackConfig`: the program (and its LM), then
each layer from its kind and options, every problem gathered into one ``ConfigurationError`` named by its path
(``layers[3].max_wait: must be > 0``).

A value is decoded by what the option takes: a table with ``kind`` builds that object (``{kind = "Limit", ...}``);
a ``module:attr`` text, for an option that does not take text, is the object it imports (a key function, an error
class); a table for an option typed as an options model (``RetryBudget``) is that model. API keys are read only
from the environment (``api_key_env``) or a secrets file (``api_key_file``), never from the config text.
"""

from __future__ import annotations

import inspect
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar, get_args, get_origin

from pydantic import BaseModel

from resilient_dspy.config.kinds import is_import_path, resolve, resolve_kind
from resilient_dspy.config.source import Source, StackConfig, load_config
from resilient_dspy.errors import ConfigurationError

__all__ = ["build_pipeline", "build_program"]

P = TypeVar("P")
Problems = list[tuple[str, str]]

_LM_SECRETS = ("api_key_env", "api_key_file")


def build_pipeline(cls: Callable[..., P], source: Source, *, environment: bool = True) -> P:
    """``cls(program, *layers, name=...)`` from ``source``; raises one ConfigurationError listing every problem."""
    config = source if isinstance(source, StackConfig) else load_config(source, environment=environment)
    problems: Problems = []
    program = build_program(config.program, problems)
    store = build_store(config.store, problems) if config.store is not None else None
    layers = [_layer(entry, f"layers[{index}]", problems, store) for index, entry in enumerate(config.layers)]
    if problems:
        raise ConfigurationError(problems)
    try:
        pipeline = cls(program, *layers, name=config.name)
    except ConfigurationError as error:
        raise ConfigurationError([_renamed(field, rule, "pipeline") for field, rule in error.problems]) from None
    if set(config.program) != {"signature"}:  # a lone Predict's signature is in describe() already
        pipeline.program_source = dict(config.program)  # type: ignore[attr-defined]
    return pipeline


def build_program(spec: dict[str, Any], problems: Problems) -> Any:
    """The program a ``[program]`` table names: ``signature`` (a ``dspy.Predict``) or ``module`` (an instance, a
    class called with no arguments, or an ``async def``), then ``load`` (a saved program's state), then ``lm``."""
    import dspy

    known = {"signature", "module", "load", "lm"}
    for key in sorted(set(spec) - known):
        problems.append((f"program.{key}", f"unknown key: use {', '.join(sorted(known))}"))
    signature, module = spec.get("signature"), spec.get("module")
    program: Any = None
    if (signature is None) == (module is None):
        problems.append(("program", "give exactly one of signature= ('question -> answer') or module= ('pkg.mod:qa')"))
    elif signature is not None:
        try:
            program = dspy.Predict(signature)
        except Exception as error:
            problems.append(("program.signature", f"is not a DSPy signature ({error})"))
    else:
        try:
            program = resolve(str(module))
            if inspect.isclass(program):
                program = program()
        except (ValueError, TypeError) as error:
            problems.append(("program.module", str(error)))
    load = spec.get("load")
    if load is not None and program is not None:
        if not isinstance(program, dspy.Module):
            problems.append(("program.load", "only a DSPy program's state can be loaded"))
        else:
            try:
                program.load(str(Path(load)))
            except Exception as error:
                problems.append(("program.load", f"cannot load {load!r}: {error}"))
    lm_spec = spec.get("lm")
    if lm_spec is not None:
        lm = build_lm(lm_spec, "program.lm", problems)
        if program is not None and lm is not None:
            if isinstance(program, dspy.Module):
                program.set_lm(lm)
            else:
                problems.append(("program.lm", "only a DSPy program takes an LM (an async def calls its own)"))
    return program


def build_lm(spec: Any, path: str, problems: Problems) -> Any:
    """A ``dspy.LM`` (or ``kind``'s LM class) from a table; the API key only from ``api_key_env``/``api_key_file``."""
    if isinstance(spec, str):
        spec = {"model": spec}
    if not isinstance(spec, dict):
        problems.append((path, f"must be a table with model= (got {spec!r:.80})"))
        return None
    options = {key: value for key, value in spec.items() if key not in ("kind", *_LM_SECRETS)}
    if "api_key" in options:
        problems.append(
            (f"{path}.api_key", "never in the config text: name an environment variable (api_key_env) or a file")
        )
        return None
    secret = _secret(spec, path, problems)
    if secret is not None:
        options["api_key"] = secret
    try:
        kind = resolve_kind(str(spec.get("kind", "LM")))
        return kind(**options)
    except (ValueError, TypeError) as error:
        problems.append((path, str(error)))
    except ConfigurationError as error:
        problems.extend(_renamed(field, rule, path) for field, rule in error.problems)
    return None


def _secret(spec: dict[str, Any], path: str, problems: Problems) -> str | None:
    variable, file = spec.get("api_key_env"), spec.get("api_key_file")
    if variable is not None:
        value = os.environ.get(str(variable))
        if not value:
            problems.append((f"{path}.api_key_env", f"the environment variable {variable!r} is not set"))
        return value
    if file is not None:
        try:
            return Path(str(file)).read_text(encoding="utf-8").strip()
        except OSError as error:
            problems.append((f"{path}.api_key_file", f"cannot read it: {error.strerror or error}"))
    return None


def build_store(spec: dict[str, Any], problems: Problems) -> Any:
    """The ``[store]`` table's store (``kind`` defaults to ``RedisStore``), one object for every layer; its URL may
    come from the environment (``url_env``), as it may hold a password."""
    options = {key: value for key, value in spec.items() if key not in ("kind", "url_env")}
    variable = spec.get("url_env")
    if variable is not None:
        url = os.environ.get(str(variable))
        if not url:
            problems.append(("store.url_env", f"the environment variable {variable!r} is not set"))
            return None
        options["url"] = url
    try:
        cls = resolve_kind(str(spec.get("kind", "RedisStore")))
    except ValueError as error:
        problems.append(("store.kind", str(error)))
        return None
    return _construct(cls, options, "store", problems)


def _layer(entry: dict[str, Any], path: str, problems: Problems, store: Any = None) -> Any:
    kind = entry.get("layer")
    if not isinstance(kind, str):
        problems.append((f"{path}.layer", 'names the layer\'s kind, e.g. layer = "Timeout" or "pkg.mod:MyLayer"'))
        return None
    try:
        cls = resolve_kind(kind)
    except ValueError as error:
        problems.append((f"{path}.layer", str(error)))
        return None
    described = isinstance(entry.get("options"), dict)
    options = dict(entry["options"]) if described else {k: v for k, v in entry.items() if k != "layer"}
    return _construct(cls, options, path, problems, lenient=described, store=store)


def _construct(
    cls: Any, options: dict[str, Any], path: str, problems: Problems, *, lenient: bool = False, store: Any = None
) -> Any:
    """``cls(**decoded options)``; a variadic parameter (``*limits``) takes its option's list positionally.

    ``lenient`` (a ``describe()`` entry) drops options the constructor does not take: derived figures such as a
    breaker's ``mode``; a config file's unknown option is a problem. ``store`` (the ``[store]`` table's) goes to
    every object that takes ``store=`` and names none of its own (a table with ``kind``), nested ones included.
    """
    if isinstance(cls, type) and issubclass(cls, BaseModel) and not hasattr(cls, "options_type"):
        annotations = {name: field.annotation for name, field in cls.model_fields.items()}
    else:
        annotations = _annotations(cls)
    try:
        parameters = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        parameters = {}  # type: ignore[assignment]
    dumped_defaults = _dumped_defaults(cls) if lenient else {}
    variadic = next((p.name for p in parameters.values() if p.kind is p.VAR_POSITIONAL), None)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    positional: list[Any] = []
    keywords: dict[str, Any] = {}
    before = len(problems)
    for name, value in options.items():
        if name not in parameters and not takes_any:
            if not lenient:
                problems.append((f"{path}.{name}", f"is not an option of {getattr(cls, '__name__', cls)}"))
            continue
        if lenient and ((name in dumped_defaults and value == dumped_defaults[name]) or value == "default"):
            continue  # describe() shows the default as its dump (a function by name): the default it is
        decoded = decode(value, annotations.get(name), f"{path}.{name}", problems, store)
        if name == variadic:
            positional.extend(decoded if isinstance(decoded, list | tuple) else [decoded])
        else:
            keywords[name] = decoded
    if len(problems) > before:
        return None
    own = options.get("store")
    if store is not None and "store" in parameters and not (isinstance(own, dict) and "kind" in own):
        keywords["store"] = store  # one store for every layer and backend that keeps shared state
    try:
        return cls(*positional, **keywords)
    except ConfigurationError as error:
        problems.extend(_renamed(field, rule, path) for field, rule in error.problems)
    except (TypeError, ValueError) as error:
        problems.append((path, f"{getattr(cls, '__name__', cls)} refused its options: {error}"))
    return None


def decode(value: Any, annotation: Any, path: str, problems: Problems, store: Any = None) -> Any:
    """A config value as the option takes it (see the module docstring); problems are appended under ``path``;
    ``store`` is the ``[store]`` table's, for the objects built here."""
    if isinstance(value, dict) and "kind" in value:
        spec = dict(value)
        kind = str(spec.pop("kind"))
        try:
            cls = resolve_kind(kind)
        except ValueError as error:
            problems.append((f"{path}.kind", str(error)))
            return None
        if _is_lm_class(cls):
            return build_lm(value, path, problems)
        return _construct(cls, spec, path, problems, store=store)
    if isinstance(value, dict):
        model = _model_arm(annotation)
        if model is not None:
            return _construct(model, dict(value), path, problems)
        return value
    if isinstance(value, list | tuple):
        item = _item_annotation(annotation)
        return type(value)(decode(x, item, f"{path}[{i}]", problems, store) for i, x in enumerate(value))
    if isinstance(value, str) and is_import_path(value) and not _takes_text(annotation):
        try:
            return resolve(value)
        except ValueError as error:
            if not _takes_anything(annotation):
                problems.append((path, str(error)))
    return value


def _dumped_defaults(cls: Any) -> dict[str, Any]:
    """Each option's default as its options model dumps it, where the dump is not the default itself."""
    model = getattr(cls, "options_type", None)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        return {}
    try:
        dumped = model.model_construct().model_dump()
    except Exception:
        return {}
    fields = model.model_fields
    return {name: value for name, value in dumped.items() if name in fields and value != fields[name].default}


def _is_lm_class(cls: Any) -> bool:
    import dspy

    return isinstance(cls, type) and issubclass(cls, dspy.BaseLM)


def _annotations(cls: Any) -> dict[str, Any]:
    """The option types: the layer's options model when it has one, else its constructor's annotations."""
    model = getattr(cls, "options_type", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: field.annotation for name, field in model.model_fields.items()}
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:
        return {}


def _arms(annotation: Any) -> tuple[Any, ...]:
    origin = get_origin(annotation)
    if origin is typing.Annotated:
        return _arms(get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        return tuple(arm for part in get_args(annotation) for arm in _arms(part))
    return (annotation,)


def _takes_text(annotation: Any) -> bool:
    """True when the option is text as written (``str``, a ``Literal``): an import path there is not resolved."""
    return any(arm is str or get_origin(arm) is typing.Literal for arm in _arms(annotation))


def _takes_anything(annotation: Any) -> bool:
    """An option typed ``Any`` (or not typed): a ``module:attr`` text is imported when it can be, else kept."""
    return annotation is None or any(arm is Any for arm in _arms(annotation))


def _model_arm(annotation: Any) -> type[BaseModel] | None:
    models = [arm for arm in _arms(annotation) if isinstance(arm, type) and issubclass(arm, BaseModel)]
    return models[0] if len(models) == 1 else None


def _item_annotation(annotation: Any) -> Any:
    for arm in _arms(annotation):
        args = get_args(arm)
        if get_origin(arm) in (tuple, list, set, frozenset) and args:
            return args[0]
    return None


def _renamed(field: str, rule: str, path: str) -> tuple[str, str]:
    """``Bulkhead.max_wait`` as ``layers[3].max_wait``: the owner's name replaced by the config path."""
    _, dot, rest = field.partition(".")
    return (f"{path}.{rest}" if dot else path, rule)
