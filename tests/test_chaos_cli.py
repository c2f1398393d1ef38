"""``resilient-dspy chaos TARGET``: exit codes 0/1/2, the JSON scorecard, and clear messages for a bad TARGET."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from resilient_dspy.chaos_cli import SCENARIOS
from resilient_dspy.cli import main

pytestmark = pytest.mark.looptime(False)  # the command runs its own virtual-time loops

EXAMPLES = Path(__file__).parent.parent / "examples"
FRAGILE = f"{EXAMPLES / 'fragile_pipeline.py'}:build"
STURDY = f"{EXAMPLES / 'sturdy_pipeline.py'}:build"


def chaos(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["chaos", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_sturdy_pipeline_passes_every_scenario(capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0 and every scenario handled, in the JSON shape documented in the guide."""
    code, out, _ = chaos(capsys, STURDY, "--calls", "20", "--json")
    report = json.loads(out)
    assert code == 0 and report["passed"] is True
    assert [s["name"] for s in report["scenarios"]] == [s.name for s in SCENARIOS]
    first = report["scenarios"][0]
    assert set(first) >= {"name", "handled", "calls", "ok", "failed", "lost", "lm_calls", "p50", "p99", "broken"}
    assert all(s["handled"] and s["lost"] == 0 and s["lm_calls"] >= 1 for s in report["scenarios"])


def test_the_fragile_pipeline_is_caught(capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 1, with each of its flaws named: lost calls on hangs, retried permanent errors, hidden DSPy retries."""
    code, out, _ = chaos(capsys, FRAGILE, "--calls", "30", "--json", "--scenarios", "hang,context_window,rate_limit")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    broken = {s["name"]: set(s["broken"]) for s in report["scenarios"]}
    assert broken == {
        "hang": {"no_lost_call"},
        "context_window": {"permanent_errors_not_retried"},
        "rate_limit": {"attempts_within_bounds"},
    }
    assert any("num_retries=3" in w for s in report["scenarios"] for w in s["warnings"])


def test_the_table_names_the_broken_invariant(capsys: pytest.CaptureFixture[str]) -> None:
    """Without --json: a rich table with the verdict, and each violation's call and message."""
    code, out, _ = chaos(capsys, FRAGILE, "--calls", "30", "--scenarios", "hang")
    assert code == 1
    assert "chaos scorecard" in out and "no_lost_call" in out and "1 of 1 scenarios broke an invariant" in out


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("no_colon_here", "TARGET must be 'module:attr'"),
        ("surely_not_a_module_xyz:build", "cannot import 'surely_not_a_module_xyz': ModuleNotFoundError"),
        ("json:nothing_here", "module 'json' has no attribute 'nothing_here'"),
        ("json:__name__", "json:__name__ is a str, not a Pipeline or a zero-argument factory"),
        ("json:dumps", "must be a Pipeline or a zero-argument factory"),
        ("json:JSONDecoder", "json:JSONDecoder() returned a JSONDecoder, not a Pipeline"),
        ("missing/file.py:build", "no such file: missing/file.py"),
    ],
)
def test_a_bad_target_exits_2_and_says_why(capsys: pytest.CaptureFixture[str], target: str, message: str) -> None:
    code, out, err = chaos(capsys, target)
    assert code == 2 and out == ""
    assert message in err


def test_an_unknown_scenario_exits_2_and_lists_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = chaos(capsys, STURDY, "--scenarios", "hang,meteor")
    assert code == 2
    assert "unknown scenario(s) meteor; known: rate_limit, server_error" in err


def test_bad_counts_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = chaos(capsys, STURDY, "--calls", "0", "--concurrency", "0")
    assert code == 2
    assert "--calls must be at least 1" in err and "--concurrency must be at least 1" in err
