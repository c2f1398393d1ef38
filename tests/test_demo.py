"""The demo on virtual time: the resilient pipeline answers everything the bare program drops."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import looptime
import pytest

from resilient_dspy.cli import app as cli
from resilient_dspy.cli.demo import DemoConfig, run_demo
from resilient_dspy.testing.chaos_server import ChaosServer


async def test_demo_pipeline_answers_every_question_the_bare_program_drops() -> None:
    """With faults injected, the bare program fails some calls; the pipeline answers all of them."""
    report = await run_demo(DemoConfig(questions=30, concurrency=8, seed=3, progress=False))
    resilient, bare = report.resilient, report.bare
    assert resilient.answered == 30 and resilient.failed == 0
    assert bare.failed > 0 and bare.answered + bare.failed == 30
    assert resilient.retries > 0
    assert resilient.lm_calls >= 30 + resilient.retries - sum(resilient.served_by.values())
    assert bare.lm_calls >= 30
    assert sum(resilient.served_by.values()) == 30
    assert len(resilient.latencies) == len(bare.latencies) == 30


async def test_demo_heavy_chaos_uses_fallbacks() -> None:
    """When most requests fail, alternatives serve and nothing is lost; their answers are counted apart."""
    report = await run_demo(DemoConfig(questions=20, concurrency=5, seed=1, chaos=3.0, progress=False))
    resilient = report.resilient
    fallbacks = sum(n for name, n in resilient.served_by.items() if name != "primary")
    assert fallbacks > 0 and resilient.fallback == fallbacks
    assert resilient.answered + resilient.fallback == 20 and resilient.failed == 0


def _run_cli(monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> int:
    """Run the CLI with its event loop on virtual time."""
    monkeypatch.setattr(cli.asyncio, "run", lambda coro: looptime.new_event_loop().run_until_complete(coro))
    return cli.main(argv)


def test_cli_demo_json(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`resilient-dspy demo --json` prints a parseable report with both runs."""
    assert _run_cli(monkeypatch, ["demo", "--questions", "12", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["resilient"]["answered"] == 12
    assert data["bare"]["answered"] + data["bare"]["failed"] == 12
    assert [layer["layer"] for layer in data["layers"]] == [
        "Fallback",
        "Timeout",
        "RateLimiter",
        "Retry",
        "CircuitBreaker",
        "Bulkhead",
        "Timeout",
        "Cache",
        "program",
    ]


def test_cli_demo_table(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The human report names every figure the issue asks for."""
    assert _run_cli(monkeypatch, ["demo", "--questions", "6", "--no-progress"]) == 0
    out = capsys.readouterr().out
    for figure in ("answered", "failed", "retries", "fallbacks used", "LM calls made", "p50", "p95"):
        assert figure in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["demo", "--questions", "0"], "--questions: must be at least 1"),
        (["demo", "--chaos", "-1"], "--chaos: must be a number >= 0"),
        (["demo", "--concurrency", "x"], "--concurrency: must be a whole number"),
    ],
)
def test_cli_rejects_bad_flags(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Bad flags exit 2 with a message naming the flag and the rule."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@contextlib.contextmanager
def chaos_server_thread(**options: Any) -> Iterator[ChaosServer]:
    """A ChaosServer on 127.0.0.1 (free port) served by its own loop in a thread, so the CLI can asyncio.run."""
    ready = threading.Event()
    holder: dict[str, Any] = {}

    async def serve() -> None:
        async with ChaosServer(port=0, max_hang=2.0, **options) as server:
            holder["server"], holder["stop"] = server, asyncio.Event()
            holder["loop"] = asyncio.get_running_loop()
            ready.set()
            await holder["stop"].wait()

    thread = threading.Thread(target=lambda: asyncio.run(serve()), daemon=True)
    thread.start()
    assert ready.wait(30), "the chaos server did not start"
    try:
        yield holder["server"]
    finally:
        holder["loop"].call_soon_threadsafe(holder["stop"].set)
        thread.join(30)


def _demo_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code = cli.main(["demo", "--questions", "4", "--concurrency", "2", "--json", *argv])
    return code, json.loads(capsys.readouterr().out)


@pytest.mark.looptime(False)
def test_demo_against_a_real_endpoint_answers_from_the_model_and_counts_its_calls(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--model openai/x --api-base <local chaos server>`: every answer from the model, its LM calls counted."""
    monkeypatch.setenv("OPENAI_API_KEY", "local-key")
    with chaos_server_thread() as server:
        code, data = _demo_json(capsys, "--model", "openai/x", "--api-base", server.api_base)
        requests = len(server.journal)
    assert code == 0
    resilient, bare = data["resilient"], data["bare"]
    assert resilient["answered"] == 4 and resilient["fallback"] == 0 and resilient["failed"] == 0
    assert bare["answered"] == 4
    assert resilient["lm_calls"] >= 4 and bare["lm_calls"] >= 4
    assert resilient["lm_calls"] + bare["lm_calls"] == requests


@pytest.mark.looptime(False)
def test_demo_without_an_api_key_reports_no_answer_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No key: every call falls back to the static apology, which is not an answer; the command fails."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with chaos_server_thread() as server:
        code, data = _demo_json(capsys, "--model", "openai/x", "--api-base", server.api_base)
    assert code == 1
    assert data["resilient"]["answered"] == 0 and data["resilient"]["fallback"] == 4
    assert data["resilient"]["served_by"] == {"static-apology": 4}


@pytest.mark.looptime(False)
def test_demo_against_a_dead_endpoint_reports_no_answer_and_exits_1(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A port nobody listens on: retries, then fallbacks, then the static apology; answered 0, exit 1."""
    monkeypatch.setenv("OPENAI_API_KEY", "local-key")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, data = _demo_json(capsys, "--model", "openai/x", "--api-base", f"http://127.0.0.1:{port}/v1")
    assert code == 1
    assert data["resilient"]["answered"] == 0 and data["bare"]["answered"] == 0
    assert data["resilient"]["lm_calls"] >= 4
