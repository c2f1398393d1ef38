"""What the commands share: argument types whose errors name the value, and the one-line failure report."""

from __future__ import annotations

import argparse
import sys

__all__ = ["fail", "one_line"]


def one_line(message: object) -> str:
    """``message`` on one line (a multi-line ConfigurationError joined up), for a one-line CLI error."""
    return " ".join(part.strip() for part in str(message).splitlines() if part.strip())


def fail(command: str, message: object) -> int:
    """Print ``resilient-dspy COMMAND: message`` as one line on stderr; return the bad-input exit status, 2."""
    print(f"resilient-dspy {command}: {one_line(message)}", file=sys.stderr)
    return 2


def _integer(text: str) -> int:
    """An int option's value; the error names the value, not this function (argparse would say its name)."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number (got {text!r})") from None


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number (got {text!r})") from None


def _positive_int(text: str) -> int:
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _non_negative_float(text: str) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (got {text})")
    return value
