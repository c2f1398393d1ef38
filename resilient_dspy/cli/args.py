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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve`` command's options (here, so building the parser never imports FastAPI or uvicorn)."""
    parser.add_argument("--config", required=True, help="the stack config: a .toml, .yaml or .json file")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1, or RESILIENT_DSPY_SERVE_HOST)")
    parser.add_argument("--port", type=_integer, help="port (default 8000; 0 = any free port)")
    parser.add_argument(
        "--workers",
        type=_positive_int,
        help="worker processes (default 1); each has its own limits unless the layers share a Redis store",
    )
    parser.add_argument("--api-keys-file", help="a TOML file of [[keys]] name, sha256, disabled")
    parser.add_argument("--grace", type=_non_negative_float, help="seconds in-flight requests may finish on SIGTERM")
    parser.add_argument("--no-auth", action="store_true", help="serve without API keys (local use only)")
