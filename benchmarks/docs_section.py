"""The sections other scripts write into docs/benchmarks.md, after bench_peers.py's part (which it rewrites whole).

Each section sits between its script's two markers, ``<!-- bench_x.py: ... -->`` and ``<!-- /bench_x.py -->``;
bench_peers.py keeps everything from the first such marker on, so every section survives its rewrite.
"""

from __future__ import annotations

from pathlib import Path

SECTIONS_START = "<!-- bench_"
LAST = "<!-- bench_batch.py"  # bench_batch.py's section runs to the end of the file: others go before it


def first_section(text: str) -> int:
    """Where the scripts' sections begin in ``text`` (its length when there is none)."""
    at = text.find(SECTIONS_START)
    return len(text) if at < 0 else at


def write_section(path: Path, mark: str, end: str, lines: list[str]) -> None:
    """Replace the section between ``mark`` and ``end`` in ``path``, else add it before bench_batch.py's, or at
    the end. ``lines`` include both markers."""
    text = path.read_text() if path.exists() else ""
    section = "\n".join(lines)
    if mark in text and end in text:
        head, rest = text.split(mark, 1)
        path.write_text(head + section + rest.split(end, 1)[1])
    elif LAST in text:
        head, rest = text.split(LAST, 1)
        path.write_text(head.rstrip("\n") + "\n\n" + section + "\n\n" + LAST + rest)
    else:
        path.write_text(text.rstrip("\n") + "\n\n" + section + "\n")
