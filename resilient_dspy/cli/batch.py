"""``resilient-dspy batch TARGET --input in.jsonl --output out.jsonl``: a batch job that a crash cannot make lose or
repeat work.

TARGET is loaded as for ``chaos`` (a Pipeline or a zero-argument factory of one). The items run through
``pipeline.imap``, ``--concurrency`` at a time; each finished one is appended to the output as one JSON line and
flushed, so a crash or ``kill -9`` loses at most the calls in flight. Run the same command again and it resumes:
every item already in the output (matched by id, see :mod:`.jsonl`) is skipped, so none is written twice. A failed
item's line carries its typed error; ``--retry-failed`` runs those again (and only those, with the new ones).
Exit status: 0 no item of the input failed, 1 some did (their lines say why), 2 bad input, 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from resilient_dspy.cli.args import _positive_int, fail
from resilient_dspy.cli.jsonl import BatchFileError, Item, append, inputs_of, read_input, read_ledger, remove_failed
from resilient_dspy.core.batch import DEFAULT_CONCURRENCY
from resilient_dspy.core.outcome import BatchCounts

__all__ = ["BatchReport", "add_arguments", "command", "run_batch"]


@dataclass
class BatchReport:
    """What a run did: the input's size, what it skipped (already in the output) and left for later (``--limit``),
    this run's counts and errors by type, and how many items of the input the output now holds as failed."""

    inputs: int = 0
    skipped: int = 0
    pending: int = 0
    run: BatchCounts = field(default_factory=BatchCounts)
    errors: Counter[str] = field(default_factory=Counter)
    failed_in_output: int = 0
    wall: float = 0.0

    @property
    def rate(self) -> float:
        return self.run.done / self.wall if self.wall > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "skipped": self.skipped,
            "pending": self.pending,
            "run": asdict(self.run),
            "errors": dict(self.errors.most_common()),
            "failed_in_output": self.failed_in_output,
            "wall": round(self.wall, 3),
            "rate": round(self.rate, 2),
        }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``resilient-dspy batch``."""
    parser.add_argument("target", metavar="TARGET", help="module:attr or path/to/file.py:attr (Pipeline or factory)")
    parser.add_argument("--input", required=True, type=Path, help="JSONL: one item a line (an object or a question)")
    parser.add_argument("--output", required=True, type=Path, help="JSONL the results are appended to (resumable)")
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=DEFAULT_CONCURRENCY,
        help=f"calls in flight (default {DEFAULT_CONCURRENCY})",
    )
    parser.add_argument("--limit", type=_positive_int, help="run at most this many items now (resume for the rest)")
    parser.add_argument("--retry-failed", action="store_true", help="run the items the output holds as failed again")
    parser.add_argument("--id-field", default="id", help="the field holding an item's id (default: id; else its line)")
    parser.add_argument("--report", type=Path, help="also write the final report to this JSON file")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _plan(args: argparse.Namespace) -> tuple[BatchReport, set[str]]:
    """Scan the input and the output: the report so far, and the keys to skip (raises BatchFileError)."""
    ledger = read_ledger(args.output)
    report = BatchReport()
    seen: dict[str, int] = {}
    for item in read_input(args.input, args.id_field):
        first = seen.setdefault(item.key, item.line)
        if first != item.line:
            where = f"{args.input}:{item.line}"
            raise BatchFileError(f"{where}: item id {item.id!r} is also on line {first}; ids must be unique")
        report.inputs += 1
    retry = ledger.failed() & seen.keys() if args.retry_failed else set()
    if retry:
        remove_failed(args.output, retry)
    done = {key for key in ledger.ok if key in seen and key not in retry}
    report.failed_in_output = len(ledger.failed() & done)  # this run's failures are added as they are written
    report.skipped = len(done)
    todo = report.inputs - len(done)
    runs = todo if args.limit is None else min(todo, args.limit)
    report.pending = todo - runs
    report.run.total = runs
    return report, done


def _pending(args: argparse.Namespace, done: set[str], limit: int) -> Iterator[Item]:
    count = 0
    for item in read_input(args.input, args.id_field):
        if count >= limit:
            return
        if item.key not in done:
            count += 1
            yield item


async def run_batch(args: argparse.Namespace, pipeline: Any, report: BatchReport, done: set[str]) -> None:
    """Run the pending items through ``pipeline``, appending each finished one to the output, flushed."""
    from resilient_dspy.observe.progress import ProgressBar

    limit = report.run.total or 0
    items: dict[int, Item] = {}
    fields = pipeline.input_fields

    def values() -> Iterator[Any]:
        for index, item in enumerate(_pending(args, done, limit)):
            items[index] = item
            yield inputs_of(item, fields, args.id_field)

    progress = False if args.no_progress else ProgressBar(f"batch {pipeline.name}")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with _appending(args.output) as out:
        stream = pipeline.imap(values(), concurrency=args.concurrency, progress=progress, total=limit)
        try:
            async with contextlib.aclosing(stream):  # a failed write cancels the calls in flight at once
                async for index, outcome in stream:
                    try:
                        append(out, items.pop(index), outcome)
                    except OSError as error:
                        raise _unwritable(args.output, error) from error
                    report.run.add(outcome)
                    if outcome.error is not None:
                        report.errors[type(outcome.error).__name__] += 1
        finally:
            report.wall = loop.time() - started


def _unwritable(path: Path, error: OSError) -> BatchFileError:
    return BatchFileError(f"cannot write --output {path}: {os.strerror(error.errno or 0) or error}")


@contextlib.contextmanager
def _appending(path: Path) -> Iterator[TextIO]:
    try:
        out = path.open("a", encoding="utf-8")
    except OSError as error:  # no such directory, no permission
        raise _unwritable(path, error) from error
    with out:
        yield out


def _render(args: argparse.Namespace, report: BatchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    run = report.run
    table = Table(title=f"batch {args.target} → {args.output}", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", justify="right")
    errors = ", ".join(f"{name} {count}" for name, count in report.errors.most_common()) or "-"
    rows = [
        ("inputs", report.inputs),
        ("already in the output (skipped)", report.skipped),
        ("run now", run.done),
        ("  answered by the program", run.ok),
        ("  answered by a fallback", run.fallback),
        ("  failed", run.failed),
        ("  retried", run.retried),
        ("  cache hits", run.cache_hits),
        ("errors", errors),
        ("left for a later run (--limit)", report.pending),
        ("failed items in the output", report.failed_in_output),
        ("wall time", f"{report.wall:.2f} s ({report.rate:,.1f}/s)"),
    ]
    for label, value in rows:
        table.add_row(label, str(value))
    Console().print(table)


def command(args: argparse.Namespace) -> int:
    """Run ``resilient-dspy batch`` with parsed ``args``: 0 no failed item, 1 some failed, 2 bad input."""
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from resilient_dspy.cli.chaos import TargetError, load_target

    if args.input.resolve() == args.output.resolve():
        return fail("batch", "--input and --output must be different files")
    try:
        factory = load_target(args.target)
        report, done = _plan(args)
        pipeline = factory()
    except (TargetError, BatchFileError) as error:
        return fail("batch", error)
    began = time.perf_counter()
    try:
        if report.run.total:
            asyncio.run(run_batch(args, pipeline, report, done))
    except BatchFileError as error:
        return fail("batch", error)
    finally:
        if not report.wall:
            report.wall = time.perf_counter() - began
        report.failed_in_output += report.run.failed
        if args.report is not None:
            document = {"target": args.target, "input": str(args.input), "output": str(args.output)}
            args.report.write_text(json.dumps({**document, **report.to_json()}, indent=2) + "\n")
    _render(args, report)
    if report.failed_in_output:
        hint = "their lines say why; --retry-failed runs them again"
        print(f"resilient-dspy batch: {report.failed_in_output} item(s) failed: {hint}", file=sys.stderr)
        return 1
    return 0
