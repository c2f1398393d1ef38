"""The ``resilient-dspy`` command: ``demo`` now; ``chaos`` and ``bench`` join it in later releases."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 (got {value})")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0 (got {text})")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resilient-dspy", description="Reliability middleware for DSPy programs.")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a batch through a resilient pipeline and the bare program, side by side",
        description="Runs questions concurrently through a production-style pipeline (fallback, total timeout, "
        "retry, attempt timeout) and through the bare program, against a local fault-injecting LM unless "
        "--model names a real one.",
    )
    demo.add_argument("--questions", type=_positive_int, default=40, help="batch size (default 40)")
    demo.add_argument("--concurrency", type=_positive_int, default=10, help="calls in flight (default 10)")
    demo.add_argument("--seed", type=int, default=7, help="fault schedule seed (default 7)")
    demo.add_argument(
        "--chaos", type=_non_negative_float, default=1.0, help="scale of the injected fault rates (default 1.0)"
    )
    demo.add_argument("--model", help="a real DSPy model id, e.g. openai/gpt-4o-mini (needs its API key)")
    demo.add_argument("--api-base", help="endpoint for --model, e.g. a local OpenAI-compatible server")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from resilient_dspy.demo import DemoConfig, render, report_json, run_demo

    config = DemoConfig(
        questions=args.questions,
        concurrency=args.concurrency,
        seed=args.seed,
        model=args.model,
        api_base=args.api_base,
        chaos=args.chaos,
        progress=not args.no_progress and not args.json,
    )
    console = Console(stderr=args.json)
    if not config.progress:
        report = asyncio.run(run_demo(config))
    else:
        columns: Sequence[Any] = (
            TextColumn("{task.description:>18}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            tasks = {
                "resilient": progress.add_task("resilient pipeline", total=config.questions),
                "bare": progress.add_task("bare program", total=config.questions),
            }
            report = asyncio.run(run_demo(config, on_progress=lambda label: progress.advance(tasks[label])))
    if args.json:
        print(json.dumps(report_json(report), indent=2, default=str))
    else:
        console.print(render(report))
        console.print(
            "The pipeline: "
            + " ▶ ".join(
                layer.get("layer", "?") + (f"({layer['scope']})" if "scope" in layer else "") for layer in report.layers
            )
        )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "demo":
        return _demo(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
