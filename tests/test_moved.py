"""Old import paths keep working for one release: importing one warns (DeprecationWarning) and names the new path."""

from __future__ import annotations

import importlib
import sys

import pytest

from resilient_dspy._moved import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_warns_and_names_the_new_one(old: str) -> None:
    sys.modules.pop(old, None)
    new = MOVED[old]
    with pytest.warns(DeprecationWarning, match=new[0].replace(".", r"\.")):
        shim = importlib.import_module(old)
    for target in map(importlib.import_module, new):
        for name in target.__all__:
            assert getattr(shim, name) is getattr(target, name), f"{old}.{name}"


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_still_reaches_the_moved_private_names(old: str) -> None:
    with pytest.warns(DeprecationWarning):
        sys.modules.pop(old, None)
        shim = importlib.import_module(old)
    target = importlib.import_module(MOVED[old][0])
    private = [name for name in vars(target) if name.startswith("_") and not name.startswith("__")]
    for name in private:
        assert getattr(shim, name) is getattr(target, name)
    with pytest.raises(AttributeError):
        _ = shim.no_such_name


def test_the_console_script_and_the_pytest_plugin_entry_points_still_load() -> None:
    from importlib.metadata import entry_points

    scripts = [e for e in entry_points(group="console_scripts") if e.name == "resilient-dspy"]
    plugins = [e for e in entry_points(group="pytest11") if e.name == "resilient_dspy"]
    assert scripts and plugins
    assert callable(scripts[0].load())
    assert plugins[0].load().__name__ == plugins[0].value


def test_the_old_chaos_module_still_runs_as_a_script() -> None:
    import subprocess

    result = subprocess.run(
        [sys.executable, "-m", "resilient_dspy.chaos_cli"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr  # argparse: TARGET is required
    assert "TARGET" in result.stderr
