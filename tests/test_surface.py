"""The public surface (docs/architecture.md, "The public surface"): a small root, events in resilient_dspy.events, the
layer contract in resilient_dspy.core, and every name that left the root still importable there for one release,
with a DeprecationWarning naming its new module."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest

import resilient_dspy
import resilient_dspy.core
import resilient_dspy.events
from resilient_dspy._moved import MOVED, MOVED_FROM_ROOT
from resilient_dspy.events import Event

ROOT = Path(__file__).resolve().parent.parent
MAX_ROOT_NAMES = 41  # 41 today: the pipeline, the layers and their helpers, the errors callers catch, RedisStore
CONTRACT = (
    "Call",
    "CallRecord",
    "Handler",
    "Middleware",
    "Runtime",
    "Layer",
    "Clock",
    "LoopClock",
    "Options",
    "options_from",
)


def import_from_root(name: str) -> tuple[Any, list[warnings.WarningMessage]]:
    """``from resilient_dspy import <name>`` run as a line of its own, with every warning it raises."""
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(f"from resilient_dspy import {name}", "<importer>", "exec"), namespace)
    return namespace[name], caught


def test_the_root_exports_a_small_surface_of_names_it_defines() -> None:
    assert len(resilient_dspy.__all__) <= MAX_ROOT_NAMES
    assert len(set(resilient_dspy.__all__)) == len(resilient_dspy.__all__)
    assert not set(resilient_dspy.__all__) & set(MOVED_FROM_ROOT)
    assert {"Pipeline", "Retry", "Timeout", "CircuitBreaker", "ResilienceError"} <= set(resilient_dspy.__all__)


@pytest.mark.parametrize("name", sorted(MOVED_FROM_ROOT))
def test_an_old_root_name_warns_once_naming_its_new_module_and_gives_the_same_object(name: str) -> None:
    new = MOVED_FROM_ROOT[name]
    value, caught = import_from_root(name)
    assert [type(w.message) for w in caught] == [DeprecationWarning]
    assert re.search(rf"\b{re.escape(new)}\b", str(caught[0].message))
    assert caught[0].filename == "<importer>"  # the warning points at the importing line
    module = importlib.import_module(new)
    assert value is getattr(module, name)
    assert name in module.__all__  # the new path is a documented export, not a private reach


def test_an_old_root_name_read_as_an_attribute_warns_too() -> None:
    with pytest.warns(DeprecationWarning, match=r"resilient_dspy\.events"):
        event = resilient_dspy.CacheHit  # type: ignore[attr-defined]
    assert event is resilient_dspy.events.CacheHit


def test_a_name_the_root_never_had_is_still_an_attribute_error() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not hasattr(resilient_dspy, "no_such_name")
        with pytest.raises(ImportError):
            import_from_root("no_such_name")


@pytest.mark.parametrize(
    "module",
    [
        "resilient_dspy",
        "resilient_dspy.core",
        "resilient_dspy.events",
        "resilient_dspy.errors",
        *sorted(MOVED_FROM_ROOT.values()),
    ],
)
def test_the_new_surface_imports_without_a_warning(module: str) -> None:
    names = importlib.import_module(module).__all__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec(f"from {module} import {', '.join(names)}", {})


def test_a_star_import_of_the_root_is_clean_and_gives_the_surface() -> None:
    namespace: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        exec("from resilient_dspy import *", namespace)
    assert {name for name in namespace if not name.startswith("__")} == set(resilient_dspy.__all__)


def test_dir_of_the_root_shows_the_surface_and_no_old_name() -> None:
    public = {name for name in dir(resilient_dspy) if not name.startswith("_")}
    assert public == set(resilient_dspy.__all__)
    assert "__version__" in dir(resilient_dspy)


def _library_events() -> dict[str, type[Event]]:
    """Every event class the library defines (the test kit and the apps left out), by name."""
    for info in pkgutil.walk_packages(resilient_dspy.__path__, "resilient_dspy."):
        if info.name not in MOVED and not info.name.startswith(("resilient_dspy.testing", "resilient_dspy.cli")):
            importlib.import_module(info.name)
    found: dict[str, type[Event]] = {}
    pending: list[type[Event]] = [Event]
    while pending:
        for subclass in pending.pop().__subclasses__():
            pending.append(subclass)
            module = sys.modules[subclass.__module__]
            # a slots dataclass replaces the class it decorates: only the one its module holds is real
            if subclass.__module__.startswith("resilient_dspy.") and vars(module).get(subclass.__name__) is subclass:
                found[subclass.__name__] = subclass
    return found


def test_the_events_namespace_gives_every_event_class_of_the_library() -> None:
    events = _library_events()
    assert set(resilient_dspy.events.__all__) == {"Event", "EventRouter", "Listener", *events}
    for name, cls in events.items():
        assert getattr(resilient_dspy.events, name) is cls
    assert set(resilient_dspy.events.__all__) <= set(dir(resilient_dspy.events))


def test_the_events_namespace_refuses_a_name_it_does_not_have() -> None:
    with pytest.raises(AttributeError):
        _ = resilient_dspy.events.NoSuchEvent  # type: ignore[attr-defined]


def test_the_core_namespace_gives_the_layer_writing_contract() -> None:
    assert set(CONTRACT) <= set(resilient_dspy.core.__all__)
    from resilient_dspy.core.call import Call, Middleware
    from resilient_dspy.core.options import build_options

    assert resilient_dspy.core.Call is Call
    assert resilient_dspy.core.Middleware is Middleware
    assert resilient_dspy.core.build_options is build_options


def _code_blocks(path: Path) -> list[str]:
    if path.suffix == ".py":
        return [path.read_text()]
    return re.findall(r"^```python[^\n]*\n(.*?)^```", path.read_text(), re.S | re.M)


def _deprecated_root_imports(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError:  # a fragment; the docs test runs what it can
        return []
    return [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "resilient_dspy" and node.level == 0
        for alias in node.names
        if alias.name in MOVED_FROM_ROOT
    ]


def test_docs_examples_and_code_import_no_deprecated_root_name() -> None:
    sources = [
        ROOT / "README.md",
        *(ROOT / "docs").rglob("*.md"),
        *(ROOT / "examples").rglob("*.py"),
        *(ROOT / "benchmarks").rglob("*.py"),
        *(ROOT / "resilient_dspy").rglob("*.py"),
        *(path for path in (ROOT / "tests").rglob("*.py") if path.name != Path(__file__).name),
    ]
    offenders = {
        str(path.relative_to(ROOT)): names
        for path in sources
        if (names := [name for block in _code_blocks(path) for name in _deprecated_root_imports(block)])
    }
    assert offenders == {}
