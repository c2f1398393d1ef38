"""Every third-party import of the package is a declared runtime dependency, or fails with the extra to install.

The README's install command is a plain ``pip install``: what ``resilient-dspy demo``, ``chaos`` and ``chaos-server``
import must come with it. An import from an optional extra must sit at a module's top level, and importing that
module without it must either work (an optional feature) or raise ImportError naming ``resilient-dspy[extra]``.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "resilient_dspy"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def normalise(requirement: str) -> str:
    """The distribution name of a requirement string, PEP 503-normalised."""
    name = re.match(r"[A-Za-z0-9._-]+", requirement.strip())
    assert name is not None, requirement
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


DECLARED = {normalise(req) for req in PYPROJECT["project"]["dependencies"]}
EXTRAS = {
    extra: {normalise(req) for req in reqs} for extra, reqs in PYPROJECT["project"]["optional-dependencies"].items()
}
DISTRIBUTIONS = {
    name: {normalise(d) for d in dists} for name, dists in importlib.metadata.packages_distributions().items()
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def third_party_imports(path: Path) -> list[tuple[str, bool]]:
    """``(top-level name, at module level)`` for every absolute import outside the stdlib and the package.

    Imports under ``if TYPE_CHECKING:`` are left out: they never run.
    """
    tree = ast.parse(path.read_text(), str(path))
    found: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.orelse:
                visit(child, top)
            return
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        for name in names:
            root = name.split(".")[0]
            if root not in sys.stdlib_module_names and root not in ("resilient_dspy", "__future__"):
                found.append((root, top))
        inner = top and not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda)
        for child in ast.iter_child_nodes(node):
            visit(child, inner)

    visit(tree, True)
    return found


IMPORTS = sorted(
    {(module_name(path), name, top) for path in PACKAGE.rglob("*.py") for name, top in third_party_imports(path)}
)
OPTIONAL = sorted({(module, name) for module, name, _ in IMPORTS if not DISTRIBUTIONS.get(name, set()) & DECLARED})


def test_the_import_scan_finds_the_known_dependencies() -> None:
    """The scan itself works: dspy, pydantic and aiohttp are found, and each maps to its declared distribution."""
    names = {name for _, name, _ in IMPORTS}
    assert {"dspy", "pydantic", "aiohttp", "rich"} <= names
    assert DISTRIBUTIONS["dspy"] & DECLARED


@pytest.mark.parametrize(("module", "name", "top"), IMPORTS, ids=lambda v: str(v))
def test_every_import_of_a_command_or_a_lazy_import_is_declared(module: str, name: str, top: bool) -> None:
    """An import inside a function runs mid-command: it cannot be guarded at import time, so it must be declared."""
    if top and (module, name) in OPTIONAL:
        pytest.skip("a top-level optional import: its guard is checked below")
    assert DISTRIBUTIONS.get(name, set()) & DECLARED, f"{module} imports {name}, not in [project].dependencies"


@pytest.mark.parametrize(("module", "name"), OPTIONAL, ids=lambda v: str(v))
def test_an_optional_import_fails_with_the_extra_to_install(module: str, name: str) -> None:
    """Without the optional package the module imports (the feature is optional) or says which extra to install."""
    script = (
        "import sys\n"
        f"sys.modules[{name!r}] = None\n"
        "try:\n"
        f"    import {module}\n"
        "except ImportError as error:\n"
        "    print('ImportError:', error)\n"
        "else:\n"
        "    print('imported')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    said = result.stdout.strip().splitlines()[-1]
    if said == "imported":
        return
    extras = re.findall(r"resilient-dspy\[([a-z0-9_-]+)\]", said)
    assert extras, f"{module} without {name}: {said!r} names no extra to install"
    assert all(DISTRIBUTIONS[name] & EXTRAS.get(extra, set()) for extra in extras), said
