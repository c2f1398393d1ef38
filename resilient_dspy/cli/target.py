"""The TARGET of ``resilient-dspy chaos``: ``module:attr`` or ``path/to/file.py:attr`` naming a Pipeline or a
zero-argument factory of one, loaded into a factory of fresh pipelines (or a clear :class:`TargetError`)."""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["TargetError", "load_target"]


class TargetError(Exception):
    """TARGET does not name a usable pipeline; the message says what is wrong."""


def load_target(spec: str) -> Callable[[], Any]:
    """A factory of fresh pipelines for ``module:attr`` or ``path/to/file.py:attr`` (raises :class:`TargetError`).

    A zero-argument factory is called once per scenario (clean state each); a Pipeline instance is reused as is:
    its breaker and limiter state carry over, and each scenario asks its own questions so its cache does not.
    """
    import dspy

    from resilient_dspy.core.pipeline import Pipeline

    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise TargetError(f"TARGET must be 'module:attr' or 'path/to/file.py:attr' (got {spec!r})")
    try:
        if module_name.endswith(".py") or os.sep in module_name or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise TargetError(f"no such file: {module_name}")
            name = f"_resilient_dspy_chaos_target_{abs(hash(str(path.resolve())))}"
            module_spec = importlib.util.spec_from_file_location(name, path)
            if module_spec is None or module_spec.loader is None:
                raise TargetError(f"cannot import {module_name} as a Python module")
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[name] = module
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except TargetError:
        raise
    except Exception as error:
        raise TargetError(f"cannot import {module_name!r}: {type(error).__name__}: {error}") from error
    if not hasattr(module, attr):
        raise TargetError(f"module {module_name!r} has no attribute {attr!r}")
    value = getattr(module, attr)
    if isinstance(value, Pipeline):
        return lambda: value
    if isinstance(value, dspy.Module):
        rule = "wrap it, e.g. Pipeline(program, Timeout(30), Retry(3))"
        raise TargetError(f"{spec} is a DSPy {type(value).__name__}, not a Pipeline: {rule}")
    if not callable(value):
        raise TargetError(f"{spec} is a {type(value).__name__}, not a Pipeline or a zero-argument factory of one")
    try:
        inspect.signature(value).bind()
    except TypeError as error:
        raise TargetError(f"{spec} must be a Pipeline or a zero-argument factory of one ({error})") from None
    except ValueError:  # no signature to read (some builtins): let the call say
        pass

    def factory() -> Pipeline:
        try:
            built = value()
        except Exception as error:  # the factory's own failure (no API key, bad settings): report it, exit 2
            raise TargetError(f"{spec}() raised {type(error).__name__}: {error}") from error
        if not isinstance(built, Pipeline):
            raise TargetError(f"{spec}() returned a {type(built).__name__}, not a Pipeline")
        return built

    factory()  # fail early (exit 2) rather than in the middle of the battery
    return factory
