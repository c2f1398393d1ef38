"""The demo on virtual time: the resilient pipeline answers everything the bare program drops."""

from __future__ import annotations

import json

import looptime
import pytest

from resilient_dspy import cli
from resilient_dspy.demo import DemoConfig, run_demo


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
    """When most requests fail, alternatives serve and nothing is lost."""
    report = await run_demo(DemoConfig(questions=20, concurrency=5, seed=1, chaos=3.0, progress=False))
    assert report.resilient.answered == 20
    assert sum(n for name, n in report.resilient.served_by.items() if name != "primary") > 0


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
