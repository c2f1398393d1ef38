"""The ``resilient-dspy`` command: ``demo``, ``chaos-server`` (a local OpenAI-compatible endpoint with faults),
``chaos`` (a scorecard of your pipeline under a battery of fault scenarios) and ``batch`` (a resumable batch job)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from resilient_dspy.cli.args import _integer, _non_negative_float, _number, _positive_int, fail

__all__ = ["fail", "main"]


def _parser() -> argparse.ArgumentParser:
    from resilient_dspy import __version__

    parser = argparse.ArgumentParser(prog="resilient-dspy", description="Reliability middleware for DSPy programs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser(
        "demo",
        help="run a batch through a resilient pipeline and the bare program, side by side",
        description="Runs questions concurrently through the recommended pipeline (Fallback, total Timeout, "
        "RateLimiter, Retry, CircuitBreaker, Bulkhead, attempt Timeout, Cache) and through the bare program, "
        "against a local fault-injecting LM unless --model names a real one.",
    )
    demo.add_argument("--questions", type=_positive_int, default=40, help="batch size (default 40)")
    demo.add_argument("--concurrency", type=_positive_int, default=10, help="calls in flight (default 10)")
    demo.add_argument("--seed", type=_integer, default=7, help="fault schedule seed (default 7)")
    demo.add_argument(
        "--chaos", type=_non_negative_float, default=1.0, help="scale of the injected fault rates (default 1.0)"
    )
    demo.add_argument("--model", help="a real DSPy model id, e.g. openai/gpt-4o-mini (needs its API key)")
    demo.add_argument("--api-base", help="endpoint for --model, e.g. a local OpenAI-compatible server")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    chaos = commands.add_parser(
        "chaos-server",
        help="serve a local OpenAI-compatible chat endpoint that answers DSPy prompts or fails on purpose",
        description="Serves POST /v1/chat/completions with answers in DSPy's Chat or JSON format, and injects "
        "faults: 429 with Retry-After, 5xx, hangs, dropped connections, bad JSON, malformed answers, context-window "
        "errors, quotas. Read and change them at run time with GET/POST /control/faults; read GET /control/journal. "
        "Serves only loopback addresses unless --allow-remote.",
    )
    chaos.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    chaos.add_argument("--port", type=_port, default=8089, help="port (default 8089; 0 = any free port)")
    chaos.add_argument("--allow-remote", action="store_true", help="allow a non-loopback --host (no auth!)")
    chaos.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND=RATE",
        type=_fault_rate,
        help="probability of a fault per request, e.g. --fault rate_limit=0.1 --fault server_error=0.05",
    )
    chaos.add_argument("--latency", type=_span, metavar="LOW[,HIGH]", help="latency of each request, in seconds")
    chaos.add_argument(
        "--retry-after", type=_span, metavar="LOW[,HIGH]", help="Retry-After of injected 429s (default 0.5,2)"
    )
    chaos.add_argument("--rpm", type=_positive_int, help="requests-per-minute quota (429 + Retry-After beyond it)")
    chaos.add_argument("--tpm", type=_positive_int, help="tokens-per-minute quota")
    chaos.add_argument("--seed", type=_integer, default=0, help="seed of the fault draws (default 0)")
    chaos.add_argument(
        "--max-hang", type=_positive_float, default=30.0, help="longest a hang lasts before the connection is dropped"
    )
    scorecard = commands.add_parser(
        "chaos",
        help="run a battery of fault scenarios against your pipeline and print a scorecard of its invariants",
        description="Runs each failure mode alone, then mixes, through TARGET (module:attr or file.py:attr, a "
        "Pipeline or a zero-argument factory of one) with a fault-injecting LM on virtual time, and checks the "
        "invariants (no lost call, deadline, attempts, cancellation, permanent errors, no orphan tasks). "
        "Exit 0: all handled; 1: an invariant broke; 2: bad input.",
    )
    from resilient_dspy.cli.chaos import add_arguments

    add_arguments(scorecard)
    from resilient_dspy.cli.batch import add_arguments as add_batch_arguments

    add_batch_arguments(
        commands.add_parser(
            "batch",
            help="run a JSONL file of inputs through your pipeline into a JSONL of results, resumable after a crash",
            description="Runs every line of --input (a JSON object of inputs, or a question) through TARGET "
            "(module:attr or file.py:attr, a Pipeline or a zero-argument factory of one) and appends one JSON line "
            "per finished item to --output, flushed, so a crash loses at most the calls in flight. Rerun the same "
            "command to resume: items already in the output (by their 'id' field, else their line number) are "
            "skipped, never written twice. Failed items carry their typed error; --retry-failed runs them again. "
            "Exit 0: no item failed; 1: some failed; 2: bad input; 130: interrupted.",
        )
    )
    return parser


def _port(text: str) -> int:
    value = _integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (got {value})")
    return value


def _positive_float(text: str) -> float:
    value = _number(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a number > 0 (got {text})")
    return value


def _span(text: str) -> tuple[float, float]:
    try:
        parts = [_non_negative_float(part) for part in text.split(",")]
    except argparse.ArgumentTypeError:
        parts = []
    if len(parts) not in (1, 2) or parts[0] > parts[-1]:
        raise argparse.ArgumentTypeError(f"must be SECONDS or LOW,HIGH with LOW <= HIGH (got {text})")
    return parts[0], parts[-1]


def _fault_rate(text: str) -> tuple[str, float]:
    from resilient_dspy.testing.fault_lm import FaultProfile

    kind, _, rate = text.partition("=")
    kinds = [name for name in FaultProfile.model_fields if name not in ("retry_after", "latency")]
    if kind not in kinds:
        raise argparse.ArgumentTypeError(f"unknown fault {kind!r}; known: {', '.join(kinds)}")
    try:
        value = float(rate)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{kind}: the rate must be a number from 0 to 1 (got {rate!r})")
    return kind, value


def _demo(args: argparse.Namespace) -> int:
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    from rich.console import Console

    from resilient_dspy.cli.demo import DemoConfig, exit_status, render, report_json, run_demo

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
    report = asyncio.run(run_demo(config))
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
    code, why = exit_status(report)
    if why is not None:
        print(f"resilient-dspy demo: {why}", file=sys.stderr)
    return code


def _chaos_server(args: argparse.Namespace) -> int:
    from resilient_dspy.errors import ConfigurationError
    from resilient_dspy.testing.chaos_server import ChaosServer

    profile: dict[str, Any] = dict(args.fault)
    if args.latency is not None:
        profile["latency"] = args.latency
    if args.retry_after is not None:
        profile["retry_after"] = args.retry_after
    quota = {"requests_per_minute": args.rpm, "tokens_per_minute": args.tpm} if args.rpm or args.tpm else None
    try:
        server = ChaosServer(
            host=args.host,
            port=args.port,
            profile=profile,
            quota=quota,
            seed=args.seed,
            max_hang=args.max_hang,
            allow_remote=args.allow_remote,
        )
    except ConfigurationError as error:
        return fail("chaos-server", error)

    async def serve() -> None:
        stop = asyncio.Event()
        with contextlib.suppress(NotImplementedError):
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with server:
            print(f"chaos server listening on {server.url}", flush=True)
            print(f"  OpenAI base URL: {server.api_base}", flush=True)
            print(
                f'  dspy.LM("openai/chaos", api_base="{server.api_base}", api_key="x", cache=False, num_retries=0)',
                flush=True,
            )
            print(
                "  control: GET/POST /control/faults, POST /control/reset, GET /control/journal, GET /health",
                flush=True,
            )
            print("Press Ctrl-C to stop.", flush=True)
            await stop.wait()

    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve())
    except OSError as error:  # the port is taken, the address is not this machine's, no permission
        reason = os.strerror(error.errno) if error.errno else str(error)
        return fail("chaos-server", f"cannot serve on {args.host}:{args.port}: {reason}")
    print("chaos server stopped", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``resilient-dspy``: 0 success, 1 a failed check (``chaos``), 2 bad input or unwritable output."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return _run(parser, args)
    except BrokenPipeError:
        # the reader went away (``| head``): say so once, and keep the interpreter's final flush from failing again
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return fail(args.command, "the output was closed before it was all written (broken pipe)")
    except KeyboardInterrupt:
        print(f"resilient-dspy {args.command}: interrupted", file=sys.stderr)
        return 130


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if args.command == "demo":
        return _demo(args)
    if args.command == "chaos":
        from resilient_dspy.cli.chaos import command

        return command(args)
    if args.command == "batch":
        from resilient_dspy.cli.batch import command as batch_command

        return batch_command(args)
    if args.command == "chaos-server":
        from resilient_dspy.testing.chaos_server import is_loopback

        if not args.allow_remote and not is_loopback(args.host):
            parser.error(f"--host {args.host} is not a loopback address; add --allow-remote to serve it (no auth!)")
        return _chaos_server(args)
    return 2  # pragma: no cover - argparse rejects unknown commands first


if __name__ == "__main__":
    sys.exit(main())
