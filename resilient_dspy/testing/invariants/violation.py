"""What a broken invariant looks like (:class:`Violation`), the shape of a journal entry the checkers read, and the
assertion that fails a test with every violation listed."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

__all__ = ["EPSILON", "Interval", "Violation", "assert_no_violations"]

EPSILON = 1e-6
"""Slack for float sums of virtual times (``t + per`` and friends)."""


@dataclass(frozen=True, slots=True)
class Violation:
    """One broken invariant: which, a message naming the call(s) and numbers, and the call index when there is one."""

    invariant: str
    message: str
    call: int | None = None

    def __str__(self) -> str:
        where = "" if self.call is None else f" (call {self.call})"
        return f"{self.invariant}{where}: {self.message}"


class Interval(Protocol):
    """A program run: a journal entry with a question, a start and an end (``inf`` while running)."""

    @property
    def question(self) -> str: ...

    @property
    def started(self) -> float: ...

    @property
    def ended(self) -> float: ...


def assert_no_violations(violations: Iterable[Violation]) -> None:
    """Raise ``AssertionError`` listing every violation (at most 20), or return when there is none."""
    found = list(violations)
    if found:
        lines = "\n".join(f"  - {v}" for v in found[:20])
        more = f"\n  … and {len(found) - 20} more" if len(found) > 20 else ""
        raise AssertionError(f"{len(found)} invariant violation(s):\n{lines}{more}")
