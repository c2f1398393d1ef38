"""``resilient-dspy batch``: one output line per input, resumable after a crash (``kill -9``), failures kept typed and
rerun with ``--retry-failed``, a report, and exit statuses 0/1/2."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from resilient_dspy.cli import main

pytestmark = pytest.mark.looptime(False)  # the command runs its own event loop

ROOT = Path(__file__).resolve().parent.parent

TARGET = textwrap.dedent(
    """
    import asyncio
    import random
    from pathlib import Path

    from resilient_dspy import Pipeline, Retry

    CALLS = Path(__file__).with_name("calls.log")
    DELAY = {delay!r}


    async def answer(question: str) -> str:
        with CALLS.open("a") as log:
            log.write(question + "\\n")
        await asyncio.sleep(random.uniform(*DELAY))
        if "bad" in question and not Path(__file__).with_name("fixed").exists():
            raise ConnectionError("the provider is down")
        return question.upper()


    def build() -> Pipeline:
        return Pipeline(answer, Retry(2, base_delay=0.001))
    """
)


def job(tmp_path: Path, items: list[Any], delay: tuple[float, float] = (0.0, 0.0)) -> dict[str, Path]:
    """A target file, an input JSONL of ``items`` and the paths of the output and the program's call log."""
    (tmp_path / "target.py").write_text(TARGET.format(delay=delay))
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    return {
        "target": tmp_path / "target.py",
        "input": tmp_path / "in.jsonl",
        "output": tmp_path / "out.jsonl",
        "calls": tmp_path / "calls.log",
    }


def batch(paths: dict[str, Path], *extra: str) -> int:
    argv = ["batch", f"{paths['target']}:build", "--input", str(paths["input"]), "--output", str(paths["output"])]
    return main([*argv, *extra])


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def calls(paths: dict[str, Path]) -> list[str]:
    return paths["calls"].read_text().splitlines() if paths["calls"].exists() else []


def questions(count: int, bad: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    return [
        {"id": f"q{i}", "question": f"{'bad ' if i in bad else ''}question {i}", "answer": "gold"} for i in range(count)
    ]


def test_every_input_gets_one_output_line_with_its_answer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Exit 0; each line has the item's id, ok, how it was served and the output (labels such as ``answer`` in the
    input are not sent to the program); a report table on stdout and nothing else there."""
    paths = job(tmp_path, questions(20))
    assert batch(paths, "--concurrency", "4") == 0
    written = lines(paths["output"])
    assert sorted(line["id"] for line in written) == sorted(f"q{i}" for i in range(20))
    first = next(line for line in written if line["id"] == "q0")
    assert first["ok"] is True and first["output"] == "QUESTION 0"
    assert {"served_by", "attempts", "retries", "duration"} <= first.keys()
    out = capsys.readouterr().out
    assert "inputs" in out and "20" in out and "━" not in out  # no progress bar off a terminal


def test_a_failed_item_carries_its_typed_error_and_the_exit_status_is_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    paths = job(tmp_path, questions(6, bad=(2, 4)))
    assert batch(paths) == 1
    failed = {line["id"]: line for line in lines(paths["output"]) if not line["ok"]}
    assert set(failed) == {"q2", "q4"}
    error = failed["q2"]["error"]
    assert error["type"] == "RetriesExhaustedError" and error["cause"] == "ConnectionError"
    assert {"kind", "retryable", "message"} <= error.keys() and failed["q2"]["attempts"] == 2
    assert "--retry-failed" in capsys.readouterr().err


def test_retry_failed_reruns_only_the_failed_items_and_writes_each_once(tmp_path: Path) -> None:
    paths = job(tmp_path, questions(6, bad=(2, 4)))
    assert batch(paths) == 1
    paths["calls"].unlink()
    (tmp_path / "fixed").touch()  # the provider is back
    assert batch(paths, "--retry-failed") == 0
    assert sorted(calls(paths)) == ["bad question 2", "bad question 4"]
    written = lines(paths["output"])
    assert len(written) == 6 and all(line["ok"] for line in written)


def test_a_rerun_skips_what_the_output_holds(tmp_path: Path) -> None:
    """``--limit`` stops early; the same command again runs only the rest; a third run runs nothing."""
    paths = job(tmp_path, questions(30))
    assert batch(paths, "--limit", "12") == 0
    assert len(lines(paths["output"])) == 12
    assert batch(paths) == 0
    assert len(calls(paths)) == 30 and len(set(calls(paths))) == 30
    assert batch(paths) == 0
    assert len(calls(paths)) == 30
    ids = Counter(line["id"] for line in lines(paths["output"]))
    assert len(ids) == 30 and set(ids.values()) == {1}


def test_a_torn_last_line_is_cut_off_and_its_item_run_again(tmp_path: Path) -> None:
    paths = job(tmp_path, questions(5))
    assert batch(paths, "--limit", "3") == 0
    with paths["output"].open("a") as out:
        out.write('{"id": "q4", "ok": tr')  # the process died in the middle of this write
    assert batch(paths) == 0
    written = lines(paths["output"])
    assert sorted(line["id"] for line in written) == [f"q{i}" for i in range(5)]


def test_items_without_an_id_are_known_by_their_line_number(tmp_path: Path) -> None:
    """A line may be a bare question; blank lines do not count as items but keep the numbering of the file."""
    paths = job(tmp_path, [])
    paths["input"].write_text('"first?"\n\n{"question": "third?"}\n')
    assert batch(paths) == 0
    assert {line["id"]: line["output"] for line in lines(paths["output"])} == {1: "FIRST?", 3: "THIRD?"}
    assert batch(paths) == 0 and len(calls(paths)) == 2


def test_the_report_file_has_the_run_figures(tmp_path: Path) -> None:
    paths = job(tmp_path, questions(8, bad=(1,)))
    assert batch(paths, "--limit", "5", "--report", str(tmp_path / "report.json")) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert (report["inputs"], report["skipped"], report["pending"], report["failed_in_output"]) == (8, 0, 3, 1)
    assert report["run"]["done"] == 5 and report["run"]["failed"] == 1 and report["run"]["ok"] == 4
    assert report["errors"] == {"RetriesExhaustedError": 1} and report["rate"] > 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"id": 1, "question": "a"}\n{"id": 1, "question": "b"}\n', "id 1 is also on line 1"),
        ('{"question": "a"}\nnot json\n', "in.jsonl:2: not a JSON value"),
        ('{"id": [1], "question": "a"}\n', "must be a string or a whole number"),
    ],
)
def test_a_bad_input_file_exits_2_and_says_where(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    paths = job(tmp_path, [])
    paths["input"].write_text(content)
    assert batch(paths) == 2
    assert message in capsys.readouterr().err and calls(paths) == []


def test_an_output_it_did_not_write_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = job(tmp_path, questions(2))
    paths["output"].write_text("some notes\n")
    assert batch(paths) == 2
    assert "out.jsonl:1" in capsys.readouterr().err and paths["output"].read_text() == "some notes\n"


def test_a_bad_target_or_the_same_file_twice_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = job(tmp_path, questions(2))
    assert main(["batch", "json:dumps", "--input", str(paths["input"]), "--output", str(paths["output"])]) == 2
    assert "must be a Pipeline or a zero-argument factory" in capsys.readouterr().err
    same = str(paths["input"])
    assert main(["batch", f"{paths['target']}:build", "--input", same, "--output", same]) == 2
    assert "different files" in capsys.readouterr().err


def _run_until_killed(paths: dict[str, Path], after_lines: int, how: signal.Signals = signal.SIGKILL) -> int:
    """Start the command in a subprocess and send it ``how`` once the output holds ``after_lines`` lines."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    argv = [sys.executable, "-m", "resilient_dspy.cli", "batch", f"{paths['target']}:build"]
    argv += ["--input", str(paths["input"]), "--output", str(paths["output"]), "--concurrency", "4"]
    process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if paths["output"].exists() and paths["output"].read_bytes().count(b"\n") >= after_lines:
                process.send_signal(how)
                break
            time.sleep(0.005)
    finally:
        if process.poll() is None and time.monotonic() >= deadline:
            process.kill()
        code = process.wait(30)
    return code


def test_killed_at_a_random_point_then_resumed_every_input_has_exactly_one_line(tmp_path: Path) -> None:
    """SIGKILL mid-run, twice, each at a random point; the reruns finish the job: one line per input, none twice,
    and only the items missing from the output were run again."""
    count = 200
    paths = job(tmp_path, questions(count), delay=(0.01, 0.03))
    seed = random.randrange(1 << 30)
    points = sorted(random.Random(seed).sample(range(5, count - 40), 2))
    for point in points:
        assert _run_until_killed(paths, point) == -signal.SIGKILL, f"seed {seed}: the run ended before the kill"
        written = paths["output"].read_bytes().count(b"\n")
        assert point <= written < count, f"seed {seed}"
    calls_before = len(calls(paths))
    kept = len(lines(paths["output"]))
    assert batch(paths, "--no-progress") == 0
    ids = Counter(line["id"] for line in lines(paths["output"]))
    assert set(ids) == {f"q{i}" for i in range(count)} and set(ids.values()) == {1}, f"seed {seed}"
    assert len(calls(paths)) - calls_before == count - kept, f"seed {seed}"


def test_ctrl_c_stops_the_run_with_status_130_and_the_output_resumable(tmp_path: Path) -> None:
    paths = job(tmp_path, questions(200), delay=(0.01, 0.03))
    assert _run_until_killed(paths, 20, signal.SIGINT) == 130
    assert all(line["ok"] for line in lines(paths["output"]))
    assert batch(paths, "--no-progress") == 0
    assert len(lines(paths["output"])) == 200


def test_an_output_that_cannot_be_written_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    paths = job(tmp_path, questions(2))
    paths["output"] = tmp_path / "no-such-directory" / "out.jsonl"
    assert batch(paths) == 2
    assert "cannot write --output" in capsys.readouterr().err and calls(paths) == []
