"""Documented examples run and print what the page says they print; the docs site builds with ``--strict``.

The rules are documented for writers in docs/writing-docs.md; in short:

Every fenced ``python`` block of README.md and docs/**/*.md is run as a script in a fresh interpreter, unless the
line before its fence says otherwise:

- ``<!-- docs-test: fragment -->``: an excerpt that cannot run alone (a method body, a line of a larger program);
- ``<!-- docs-test: pytest -->``: a test module, run as docs/testing.md says to run one outside the project
  (``python -m pytest -o asyncio_mode=auto --looptime``); its tests must pass.

What a script block claims to print is either the ``text`` (or ``output``) block right after it, or, when there is
none, the ``# prints: ...`` comments at the end of its ``print(...)`` lines, in order. The claim is compared with
the real stdout (trailing spaces and blank lines at the ends ignored); ``...`` in a claim stands for any text,
newlines included (durations, ids, the middle of a long dict). A block that prints without claiming anything fails.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]

_FENCE = re.compile(r"^```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^```[ \t]*$", re.S | re.M)
_MARKER = re.compile(r"<!--\s*docs-test:\s*(?P<mode>[\w-]+)\s*-->\s*\n\s*\Z")
_PRINTS = re.compile(r"^\s*print\(.*#\s*prints:\s?(?P<expected>.*)$")
_MODES = {"script", "fragment", "pytest"}


@dataclass(frozen=True)
class Block:
    """One fenced python block of a page: its code, how it runs, and the output the page shows for it."""

    page: Path
    line: int
    code: str
    mode: str
    expected: str | None
    claims_twice: bool = False

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """Every python block of ``page``, with its mode (marker) and its claimed output (next text block or comments)."""
    text = page.read_text()
    fences = list(_FENCE.finditer(text))
    found = []
    for index, fence in enumerate(fences):
        if fence.group("lang") != "python":
            continue
        marker = _MARKER.search(text, 0, fence.start())
        mode = marker.group("mode") if marker else "script"
        claims = [m.group("expected") for line in fence.group("body").splitlines() if (m := _PRINTS.match(line))]
        expected = "\n".join(claims) if claims else None
        following = fences[index + 1] if index + 1 < len(fences) else None
        shown = (
            following is not None
            and following.group("lang") in ("text", "output")
            and not text[fence.end() : following.start()].strip()
        )
        if shown:
            expected = following.group("body")
        line = text.count("\n", 0, fence.start()) + 1
        found.append(Block(page, line, fence.group("body"), mode, expected, claims_twice=shown and bool(claims)))
    return found


def matches_expected(expected: str, actual: str) -> bool:
    """Whether ``actual`` output is what ``expected`` claims: equal line by line, ``...`` standing for any text."""

    def normal(text: str) -> str:
        return "\n".join(line.rstrip() for line in text.strip().splitlines())

    pattern = ".*?".join(re.escape(part) for part in normal(expected).split("..."))
    return re.fullmatch(pattern, normal(actual), re.S) is not None


def run_python(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run the interpreter offline (local price map, a private DSPy cache), importing this checkout's package."""
    env = {
        **os.environ,
        "LITELLM_LOCAL_MODEL_COST_MAP": "True",
        "DSPY_CACHEDIR": str(cwd / "dspy-cache"),
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120, env=env)


def check_output(expected: str | None, result: subprocess.CompletedProcess[str], where: str) -> None:
    """Exit 0, and print exactly what is claimed (or nothing, when nothing is claimed)."""
    assert result.returncode == 0, f"{where} failed:\n{result.stderr[-3000:]}"
    if expected is None:
        assert not result.stdout.strip(), f"{where} prints but shows no expected output:\n{result.stdout}"
    else:
        assert matches_expected(expected, result.stdout), (
            f"{where} printed:\n{result.stdout}\n--- but claims:\n{expected}"
        )


ALL_BLOCKS = [block for page in PAGES for block in blocks(page)]
RUNNABLE = [block for block in ALL_BLOCKS if block.mode != "fragment"]
_PYTEST = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "asyncio_mode=auto", "--looptime"]


def run_block(block: Block, where: Path) -> subprocess.CompletedProcess[str]:
    """Run one block in its own directory: a script with python, a test module with pytest."""
    where.mkdir(parents=True, exist_ok=True)
    if block.mode == "pytest":
        (where / "test_block.py").write_text(block.code)
        return run_python([*_PYTEST, "test_block.py"], where)
    (where / "block.py").write_text(block.code)
    return run_python(["block.py"], where)


@pytest.fixture(scope="module")
def block_runs(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[subprocess.CompletedProcess[str]]]]:
    """The selected blocks, started together (each is mostly interpreter start-up and waiting): id -> its run."""
    selected = {
        item.callspec.params["block"].id
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == "test_block_prints_what_the_page_claims"
    }
    root = tmp_path_factory.mktemp("blocks")
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        yield {
            block.id: pool.submit(run_block, block, root / str(index))
            for index, block in enumerate(RUNNABLE)
            if block.id in selected
        }


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_block_prints_what_the_page_claims(
    block: Block, block_runs: dict[str, Future[subprocess.CompletedProcess[str]]]
) -> None:
    """A script block exits 0 and prints its claimed output; a pytest block's tests pass."""
    result = block_runs[block.id].result()
    if block.mode == "pytest":
        assert result.returncode == 0, f"{block.id} tests failed:\n{result.stdout[-3000:]}{result.stderr[-1000:]}"
    else:
        check_output(block.expected, result, block.id)


def test_every_block_marker_is_known() -> None:
    """A misspelt marker would silently run a fragment as a script (or skip a test): only known modes exist."""
    assert {block.mode for block in ALL_BLOCKS} <= _MODES
    assert len([b for b in ALL_BLOCKS if b.mode == "script"]) >= 30


def test_no_block_claims_its_output_twice() -> None:
    """A block shows its output either in a text block or in ``# prints:`` comments, never both (one would go
    unchecked)."""
    assert [block.id for block in ALL_BLOCKS if block.claims_twice] == []


def test_every_pattern_page_has_a_usage_example() -> None:
    """Each pattern page shows a runnable example under '## Usage'."""
    for page in sorted((ROOT / "docs" / "patterns").glob("*.md")):
        usage = re.search(r"^## Usage\n(.*?)(?=^## |\Z)", page.read_text(), re.S | re.M)
        assert usage is not None, f"{page.name} has no '## Usage' section"
        assert "```python" in usage.group(1), f"{page.name} has no python block under '## Usage'"


def test_errors_page_shows_every_error_in_its_taxonomy() -> None:
    """docs/errors.md's tree and table name every exception and warning class resilient_dspy.errors defines."""
    import resilient_dspy.errors as errors

    text = (ROOT / "docs" / "errors.md").read_text()
    tree = re.search(r"^## The taxonomy\n+```\n(.*?)```", text, re.S | re.M)
    assert tree is not None
    defined = {
        name
        for name, value in vars(errors).items()
        if isinstance(value, type) and issubclass(value, Exception | Warning) and value.__module__ == errors.__name__
    }
    assert defined - set(re.findall(r"\w+", tree.group(1))) == set()
    assert {name for name in defined if f"`{name}`" not in text} == set()


def fault_rows() -> list[tuple[str, str, str]]:
    """(page, fault kind, 'Retried…' cell) of every docs table row that says whether a fault kind is retried."""
    from resilient_dspy.testing import Fault

    kinds = {fault.value for fault in Fault}
    rows = []
    for page in PAGES:
        header: list[str] = []
        for line in page.read_text().splitlines():
            if not line.startswith("|"):
                header = []
                continue
            cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
            if not header:
                header = cells
            elif header[-1].startswith("Retried") and (kind := cells[0].strip('`"')) in kinds:
                rows.append((str(page.relative_to(ROOT)), kind, cells[-1]))
    return rows


def test_fault_tables_say_what_classify_decides() -> None:
    """Every page's 'retried' column for a fault kind agrees with classify() on the error that fault raises."""
    from resilient_dspy.errors import classify
    from resilient_dspy.testing import fault_error

    rows = fault_rows()
    assert {kind for _, kind, _ in rows} >= {"invalid_json", "rate_limit", "auth", "context_window", "malformed"}
    wrong = []
    for page, kind, cell in rows:
        error = fault_error(kind)
        if error is None:  # ok and hang raise nothing of their own
            continue
        said = cell.lstrip("*").lower().startswith("yes")
        if said != classify(error).retryable:
            wrong.append(f"{page}: {kind}: {cell}")
    assert wrong == []


@pytest.mark.parametrize(
    ("expected", "actual", "match"),
    [
        ("3 2 3", "3 2 3\n", True),
        ("took ... s", "took 1.07 s", True),
        ("a\n...\nz", "a\nb\nc\nz", True),
        ("3 2 3", "3 2 4", False),
        ("ok", "ok\nextra", False),
    ],
)
def test_expected_output_placeholder(expected: str, actual: str, match: bool) -> None:
    """``...`` stands for any text; everything else must match exactly."""
    assert matches_expected(expected, actual) is match


def test_docs_site_builds_strict() -> None:
    """``mkdocs build --strict`` passes: no broken link, no missing page in the nav, no stale API reference."""
    if not (_importable("mkdocs") and _importable("mkdocstrings") and _importable("material")):
        pytest.skip("mkdocs-material and mkdocstrings are not installed (pip install -e '.[docs]')")
    with tempfile.TemporaryDirectory() as site:
        result = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", site],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env={
                **os.environ,
                "NO_MKDOCS_2_WARNING": "1",
                "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            },
        )
    assert result.returncode == 0, result.stderr[-5000:]


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
