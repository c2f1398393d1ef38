"""``resilient-dspy chaos TARGET``: exit codes 0/1/2, the JSON scorecard, and clear messages for a bad TARGET."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import pytest

from resilient_dspy.cli import main
from resilient_dspy.cli.chaos import SCENARIOS

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


TWO_INPUTS = '''
import dspy
from resilient_dspy import Fallback, Pipeline, Retry, Static, Timeout

dspy.configure(lm=dspy.LM("openai/gpt-4o-mini", num_retries=0, cache=False))


class DropsContext(dspy.Module):
    """A program bug: its signature needs a context that forward never passes on."""

    def __init__(self):
        super().__init__()
        self.answer = dspy.ChainOfThought("question, context -> answer")

    async def aforward(self, question):
        return await self.answer.acall(question=question)


def stack(program):
    return Pipeline(program, Fallback(Static(answer="busy")), Timeout(20.0), Retry(3, base_delay=0.1), Timeout(3.0))


def build():
    return stack(dspy.ChainOfThought("question, context, top_k: int -> answer"))


def build_dropping():
    return stack(DropsContext())
'''


class _MissingInputLog(logging.Handler):
    """Collects DSPy's 'Not all input fields were provided' warnings."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Not all input fields" in str(record.msg):
            self.seen.append(record.getMessage())


def test_every_input_field_of_a_multi_input_program_is_generated(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A `question, context, top_k: int` program gets all three inputs: DSPy never logs a missing one."""
    target = tmp_path / "two_inputs.py"
    target.write_text(TWO_INPUTS)
    log = _MissingInputLog()
    logging.getLogger("dspy").addHandler(log)
    try:
        code, out, _ = chaos(capsys, f"{target}:build", "--calls", "6", "--json", "--scenarios", "server_error")
    finally:
        logging.getLogger("dspy").removeHandler(log)
    report = json.loads(out)
    assert log.seen == []
    assert code == 0 and report["passed"] is True


def test_a_call_that_logged_missing_inputs_is_scored_broken(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A program that drops an input on its way to a predictor: every scenario is broken, naming the input."""
    target = tmp_path / "two_inputs.py"
    target.write_text(TWO_INPUTS)
    code, out, _ = chaos(capsys, f"{target}:build_dropping", "--calls", "4", "--json", "--scenarios", "server_error")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    (scenario,) = report["scenarios"]
    assert "inputs_complete" in scenario["broken"]
    assert any("context" in v["message"] for v in scenario["violations"] if v["invariant"] == "inputs_complete")


BLOCKING = '''
import time

import dspy
from resilient_dspy import Pipeline, Retry, Timeout


async def blocking(question: str) -> dspy.Prediction:
    """An async def that calls something synchronous: the loop stops for its whole duration."""
    time.sleep(0.3)
    return dspy.Prediction(answer=question)


def build():
    return Pipeline(blocking, Timeout(5.0), Retry(2), Timeout(0.1))
'''


def test_a_scenario_that_blocks_the_loop_is_scored_broken(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A program that time.sleep()s: no Timeout fires, and the scorecard says how long the loop was blocked."""
    target = tmp_path / "blocking.py"
    target.write_text(BLOCKING)
    args = ("--calls", "2", "--concurrency", "1", "--scenarios", "rate_limit", "--max-block", "0.2")
    code, out, _ = chaos(capsys, f"{target}:build", *args, "--json")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False
    (scenario,) = report["scenarios"]
    assert scenario["broken"] == ["loop_not_blocked"]
    assert scenario["longest_block"] >= 0.3
    assert any("blocked for" in v["message"] for v in scenario["violations"])


def test_fallback_answers_are_counted_apart_from_answers(capsys: pytest.CaptureFixture[str]) -> None:
    """In an outage the static fallback serves: those calls are `fallback`, not `ok` (answered by the primary)."""
    code, out, _ = chaos(capsys, STURDY, "--calls", "20", "--json", "--scenarios", "storm")
    (storm,) = json.loads(out)["scenarios"]
    assert code == 0
    assert storm["fallback"] > 0
    assert storm["ok"] + storm["fallback"] + storm["failed"] == storm["calls"]


NEVER_ANSWERS = '''
import dspy
from resilient_dspy import Fallback, Pipeline, Static, Timeout


class Down(dspy.Module):
    """A provider that is down for good: every call fails before an answer."""

    def __init__(self):
        super().__init__()
        self.answer = dspy.Predict("question -> answer")

    async def aforward(self, question):
        raise dspy.LMServerError("down", status=503)


def build():
    return Pipeline(Down(), Fallback(Static(answer="busy")), Timeout(5.0))
'''


def test_a_pipeline_whose_primary_never_answers_fails_the_scorecard(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """Every call served by the static fallback: no invariant broke, but the scorecard does not pass."""
    target = tmp_path / "never.py"
    target.write_text(NEVER_ANSWERS)
    code, out, _ = chaos(capsys, f"{target}:build", "--calls", "4", "--json", "--scenarios", "rate_limit,hang")
    report = json.loads(out)
    assert code == 1 and report["passed"] is False and report["primary_answered"] == 0
    assert all(s["ok"] == 0 and s["fallback"] == 4 for s in report["scenarios"])
    code, out, _ = chaos(capsys, f"{target}:build", "--calls", "4", "--scenarios", "rate_limit")
    assert code == 1 and "the primary never answered" in out


CACHED_INSTANCE = """
import dspy
from resilient_dspy import Cache, Fallback, Pipeline, Retry, Static, Timeout

pipeline = Pipeline(
    dspy.ChainOfThought("question -> answer"),
    Fallback(Static(answer="busy")),
    Timeout(30.0),
    Retry(3),
    Timeout(5.0),
    Cache(),
)
"""


def test_a_pipeline_instance_with_a_cache_is_scored_on_its_own_answers_in_every_scenario(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """An instance keeps its state across scenarios: its cache must not serve one scenario's answers in the next
    (a hit on a key the scenario never stored looked like a cache bug)."""
    target = tmp_path / "instance.py"
    target.write_text(CACHED_INSTANCE)
    scenarios = "rate_limit,server_error,transport"
    code, out, _ = chaos(capsys, f"{target}:pipeline", "--calls", "6", "--json", "--scenarios", scenarios)
    report = json.loads(out)
    invariants = {v["invariant"] for s in report["scenarios"] for v in s["violations"]}
    assert "cache_fresh_and_clean" not in invariants
    assert code == 0 and report["passed"] is True


def test_the_overload_scenario_is_handled_by_the_adaptive_layers_with_fewer_requests() -> None:
    """The overload scenario (a stretch of 429/503) against a stack with AdaptiveThrottle and AdaptiveConcurrency:
    every invariant holds, and the throttle sends the provider fewer requests than the same stack without it."""
    import dspy

    from resilient_dspy import AdaptiveConcurrency, AdaptiveThrottle, Fallback, Pipeline, Retry, Static, Timeout
    from resilient_dspy.cli.chaos import run_scenario

    overload = next(s for s in SCENARIOS if s.name == "overload")

    def stack(*adaptive: object) -> Pipeline:
        return Pipeline(
            dspy.Predict("question -> answer"),
            Fallback(Static(answer="busy")),
            Timeout(20.0),
            Retry(4, base_delay=0.2, max_retry_after=3.0),
            *adaptive,
            Timeout(3.0),
        )

    def adaptive() -> Pipeline:
        return stack(
            AdaptiveThrottle(window=30.0, max_probability=0.5), AdaptiveConcurrency("aimd", latency_threshold=1.0)
        )

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        guarded = run_scenario(adaptive, overload, calls=40, seed=0, concurrency=10)
        bare = run_scenario(stack, overload, calls=40, seed=0, concurrency=10)
    assert guarded.handled and guarded.lost == 0, guarded.violations
    assert guarded.lm_calls < bare.lm_calls
