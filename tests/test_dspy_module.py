"""``pipeline.as_module()``: a pipeline as a ``dspy.Module`` for optimizers, copies, save/load, Evaluate, Parallel,
sync and async callers, and composition; the sync entry point (``pipeline.sync``) and its background loop.

Sync calls run on the pipeline's background loop in real time, so these tests do too (``looptime(False)``); the
ones that are sync functions have no loop of their own, as a DSPy user's script has none.
"""

from __future__ import annotations

import asyncio
import copy
import gc
import pickle
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dspy
import pytest

from resilient_dspy import Cache, CircuitBreaker, Pipeline, RateLimiter, Retry, Timeout
from resilient_dspy.core.call import Call, Handler
from resilient_dspy.core.dspy_module import ResilientModule
from resilient_dspy.errors import CircuitOpenError, RateLimitedError
from resilient_dspy.events import Event
from resilient_dspy.middleware.breaker import CircuitState, CircuitStateChanged
from resilient_dspy.middleware.ratelimit import Limit
from resilient_dspy.testing import Fault, FaultInjectingLM
from resilient_dspy.testing.invariants import limiter_respected

pytestmark = pytest.mark.looptime(False)

QUICK = {"base_delay": 0.0, "jitter": "none"}
TRAIN = [
    dspy.Example(question=f"train question {i}", answer=f"train answer {i}").with_inputs("question") for i in range(6)
]


def resilient(program: Any = None, *layers: Any) -> Pipeline:
    return Pipeline(program or dspy.Predict("question -> answer"), *(layers or (Timeout(30), Retry(3, **QUICK))))


def sent_messages(lm: FaultInjectingLM) -> str:
    """Every message of the last prompt the LM received, as one text."""
    return str(lm.history[-1]["messages"])


class WhereCalled:
    """A layer that records the thread and event loop each call runs on."""

    def __init__(self) -> None:
        self.seen: list[tuple[threading.Thread, asyncio.AbstractEventLoop]] = []

    async def __call__(self, call: Call, next: Handler) -> Any:
        self.seen.append((threading.current_thread(), asyncio.get_running_loop()))
        return await next(call)


# --- the wrapped program's parameters ---------------------------------------------------------------------------


def test_the_module_exposes_the_wrapped_programs_predictors_under_their_own_names() -> None:
    """named_predictors, predictors and named_parameters are the wrapped program's, same names, same objects."""
    program = dspy.ChainOfThought("question -> answer")
    module = resilient(program).as_module()
    assert isinstance(module, dspy.Module) and isinstance(module, ResilientModule)
    assert module.named_predictors() == program.named_predictors()
    assert module.named_parameters() == program.named_parameters()
    assert module.predictors() == program.predictors()


def test_a_nested_pipeline_exposes_the_innermost_program() -> None:
    program = dspy.Predict("question -> answer")
    module = Pipeline(resilient(program), Timeout(60)).as_module()
    assert module.program is program and module.predictors() == [program]


# --- sync and async callers, the background loop -----------------------------------------------------------------


def test_a_sync_caller_gets_an_answer_through_every_layer() -> None:
    """Regression: a sync caller got a coroutine back. module(question=...) from sync code answers, a Retry of the
    pipeline still retries, and the call ran on the pipeline's background loop, not in the caller's thread."""
    lm = FaultInjectingLM(script=["server_error"])
    where = WhereCalled()
    pipeline = resilient(None, Timeout(30), Retry(3, **QUICK), where)
    module = pipeline.as_module()
    with dspy.context(lm=lm):
        prediction = module(question="sync?")
    assert prediction.answer and lm.requests == 2
    assert {thread for thread, _ in where.seen} == {pipeline.portal.thread}
    assert pipeline.portal.thread is not threading.current_thread()
    pipeline.portal.close()


def test_pipeline_sync_is_the_sync_entry_point_of_a_plain_pipeline() -> None:
    lm = FaultInjectingLM(answers={"hi": "hello"})
    pipeline = resilient()
    with dspy.context(lm=lm):
        assert pipeline.sync("hi").answer == "hello"
    pipeline.portal.close()


async def test_an_async_caller_runs_on_its_own_loop() -> None:
    lm = FaultInjectingLM(answers={"hi": "hello"})
    where = WhereCalled()
    module = resilient(None, where).as_module()
    with dspy.context(lm=lm):
        prediction = await module.acall(question="hi")
    assert prediction.answer == "hello"
    assert where.seen == [(threading.current_thread(), asyncio.get_running_loop())]
    assert module.pipeline.portal.thread is None  # never started: no sync call was made


def test_sync_callers_on_many_threads_share_one_loop() -> None:
    """Eight threads calling at once: every call runs on the one background loop (layer state lives on one loop)."""
    where = WhereCalled()
    pipeline = resilient(None, where)
    module = pipeline.as_module()
    lm = FaultInjectingLM()
    answers: list[Any] = []

    def call(index: int) -> None:
        with dspy.context(lm=lm):
            answers.append(module(question=f"q{index}"))

    threads = [threading.Thread(target=call, args=(index,)) for index in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answers) == 8
    assert {(thread, loop) for thread, loop in where.seen} == {(pipeline.portal.thread, where.seen[0][1])}
    pipeline.portal.close()


def test_the_background_loop_starts_at_the_first_sync_call_and_close_joins_its_thread() -> None:
    pipeline = resilient()
    assert pipeline.portal.thread is None
    with dspy.context(lm=FaultInjectingLM()):
        pipeline.sync("q")
    thread = pipeline.portal.thread
    assert thread is not None and thread.is_alive()
    pipeline.portal.close()
    assert not thread.is_alive()
    with pytest.raises(RuntimeError):
        pipeline.sync("q")


def test_leaving_the_portal_context_closes_the_loop() -> None:
    pipeline = resilient()
    with pipeline.portal, dspy.context(lm=FaultInjectingLM()):
        pipeline.sync("q")
        thread = pipeline.portal.thread
    assert thread is not None and not thread.is_alive()


def test_a_collected_pipeline_stops_its_loop() -> None:
    """No thread outlives its pipeline: once the pipeline (and its modules) are garbage, the loop stops."""

    def use() -> threading.Thread:
        pipeline = resilient()
        with dspy.context(lm=FaultInjectingLM()):
            pipeline.as_module()(question="q")
        assert pipeline.portal.thread is not None
        return pipeline.portal.thread

    thread = use()
    waited_until = time.monotonic() + 10  # a bound, not a timing claim: collect until the last reference is gone
    while thread.is_alive() and time.monotonic() < waited_until:
        gc.collect()  # a reference may still sit in a frame of DSPy's worker threads for a moment
        thread.join(0.1)
    assert not thread.is_alive()


def test_a_script_that_never_closes_the_loop_exits_cleanly(tmp_path: Path) -> None:
    """At interpreter exit a loop still running is closed: the script ends, with status 0 and no traceback."""
    script = tmp_path / "script.py"
    script.write_text(
        "import dspy\n"
        "from resilient_dspy import Pipeline, Retry\n"
        "from resilient_dspy.testing import FaultInjectingLM\n"
        "dspy.configure(lm=FaultInjectingLM(answers={'q': 'a'}))\n"
        "module = Pipeline(dspy.Predict('question -> answer'), Retry(2)).as_module()\n"
        "print(module(question='q').answer)\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout.strip(), "Traceback" in done.stderr) == (0, "a", False)


def test_a_sync_call_from_the_pipelines_own_loop_is_refused() -> None:
    """A sync call made on the background loop would wait for itself: RuntimeError, not a deadlock."""
    pipeline: Pipeline

    class CallsBack:
        async def __call__(self, call: Call, next: Handler) -> Any:
            if call.inputs["question"] == "outer":
                return pipeline.sync("inner")
            return await next(call)

    pipeline = resilient(None, CallsBack())
    with dspy.context(lm=FaultInjectingLM()), pytest.raises(RuntimeError):
        pipeline.sync("outer")
    pipeline.portal.close()


# --- copies ------------------------------------------------------------------------------------------------------


def test_a_copy_has_its_own_program_and_shares_the_layers() -> None:
    """deepcopy copies the program (a change to the copy's demos leaves the original alone) and rebuilds the
    pipeline around it with the same layer instances: no lock is copied, nothing is copied twice."""
    breaker = CircuitBreaker(failure_threshold=1, break_duration=60)
    module = resilient(None, breaker).as_module()
    twin = copy.deepcopy(module)
    assert twin.program is not module.program and twin.pipeline is not module.pipeline
    assert twin.pipeline.layers == module.pipeline.layers and twin.pipeline.portal is module.pipeline.portal
    twin.predictors()[0].demos = [TRAIN[0]]
    assert module.predictors()[0].demos == []


async def test_copies_share_what_models_the_outside_a_quota_never_doubles() -> None:
    """A rate limiter's quota and a breaker's view of the model's health are shared by copies: the limiter admits
    2 calls in all, whichever copy makes them, and a circuit opened by a copy's failure rejects the original."""
    limiter = RateLimiter(requests=2, per=3600, max_wait=0.01)
    module = resilient(None, limiter).as_module()
    twin = module.reset_copy()
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        await module.acall(question="one")
        await twin.acall(question="two")
        with pytest.raises(RateLimitedError):
            await module.acall(question="three")
    breaker = CircuitBreaker(failure_threshold=1, break_duration=3600)
    module = resilient(None, breaker).as_module()
    twin = module.deepcopy()
    with dspy.context(lm=FaultInjectingLM(script=["server_error"])):
        with pytest.raises(dspy.LMServerError):
            await twin.acall(question="fails")
        with pytest.raises(CircuitOpenError):
            await module.acall(question="rejected")


async def test_a_copy_gets_its_own_cache_keys_on_the_shared_backend() -> None:
    """A compiled copy (other demos) never reads the original's cached answer; an identical copy does, since the
    answers live in the one backend."""
    lm = FaultInjectingLM()
    module = resilient(None, Cache()).as_module()
    identical = module.deepcopy()
    compiled = module.deepcopy()
    compiled.predictors()[0].demos = [TRAIN[0]]
    with dspy.context(lm=lm):
        await module.acall(question="cached?")
        await identical.acall(question="cached?")
        assert lm.requests == 1
        await compiled.acall(question="cached?")
    assert lm.requests == 2


async def test_a_copy_starts_with_no_history_and_the_same_callbacks() -> None:
    module = resilient().as_module()
    with dspy.context(lm=FaultInjectingLM()):
        await module.acall(question="q")
    assert module.history
    assert copy.deepcopy(module).history == []


def test_a_module_holding_a_pipeline_copies_cleanly_after_a_call_and_compiles_its_real_predictor() -> None:
    """Regression: a pipeline kept inside a dspy.Module could not be deep-copied after a call ('cannot pickle
    _thread.lock'); DSPy fell back to a shallow copy, and the compiled copy ran the original, unoptimised predictor
    (LabeledFewShot gave the copy 2 demos, the prompt sent 0). Kept as as_module(), the demos reach the prompt."""

    class Answerer(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.resilient = resilient().as_module()

        def forward(self, question: str) -> Any:
            return self.resilient(question=question)

    lm = FaultInjectingLM()
    student = Answerer()
    with dspy.context(lm=lm):
        student(question="warm up")  # a call first: the layers now hold locks, futures, a running loop
        compiled = dspy.LabeledFewShot(k=2).compile(student, trainset=TRAIN)
        compiled(question="what now?")
    (predictor,) = compiled.predictors()
    assert len(predictor.demos) == 2
    assert all(demo.question in sent_messages(lm) for demo in predictor.demos)
    student.resilient.pipeline.portal.close()


# --- optimizers --------------------------------------------------------------------------------------------------


def test_labeled_few_shot_compiles_the_wrapped_program_and_its_demos_reach_the_prompt() -> None:
    lm = FaultInjectingLM()
    module = resilient().as_module()
    with dspy.context(lm=lm):
        compiled = dspy.LabeledFewShot(k=2).compile(module, trainset=TRAIN)
        compiled(question="after compiling")
    assert isinstance(compiled, ResilientModule) and compiled is not module
    (predictor,) = compiled.predictors()
    assert len(predictor.demos) == 2
    assert module.predictors()[0].demos == []  # the student is left as it was
    messages = sent_messages(lm)
    assert all(demo.question in messages and demo.answer in messages for demo in predictor.demos)
    module.pipeline.portal.close()


def test_bootstrap_few_shot_runs_the_teacher_through_the_layers_and_the_compiled_demos_reach_the_prompt() -> None:
    """The teacher's runs go through the pipeline (a scripted server error is retried), the bootstrapped demos are
    the wrapped predictor's, and the compiled module sends them."""
    lm = FaultInjectingLM(script=["server_error"])
    module = resilient().as_module()
    optimizer = dspy.BootstrapFewShot(metric=lambda example, prediction, trace=None: True, max_bootstrapped_demos=2)
    with dspy.context(lm=lm):
        compiled = optimizer.compile(module, trainset=TRAIN)
        compiled(question="after bootstrapping")
    (predictor,) = compiled.predictors()
    assert len(predictor.demos) >= 2
    assert lm.journal[0].fault is Fault.SERVER_ERROR  # the teacher's first run was retried by the Retry layer
    assert all(str(demo.question) in sent_messages(lm) for demo in predictor.demos)
    module.pipeline.portal.close()


def test_gepa_compiles_offline_and_returns_a_module_that_still_runs_through_the_layers() -> None:
    """GEPA (a reflection LM of its own) evaluates candidates through the module from its threads and returns a
    ResilientModule; a call of the result is still retried by the pipeline."""
    lm = FaultInjectingLM()
    reflection = FaultInjectingLM("fault/reflect")

    def metric(gold: Any, prediction: Any, trace: Any = None, pred_name: Any = None, pred_trace: Any = None) -> Any:
        return dspy.Prediction(score=0.5, feedback="shorter, please")

    optimizer = dspy.GEPA(metric=metric, max_metric_calls=12, reflection_lm=reflection, num_threads=2)
    module = resilient().as_module()
    with dspy.context(lm=lm):
        compiled = optimizer.compile(module, trainset=TRAIN[:3], valset=TRAIN[:3])
        lm.push("server_error")
        before = lm.requests
        assert compiled(question="after GEPA").answer
    assert isinstance(compiled, ResilientModule) and lm.requests == before + 2
    module.pipeline.portal.close()


def test_mipro_v2_compiles_offline_and_its_chosen_instruction_and_demos_reach_the_prompt() -> None:
    """MIPROv2 (optuna's search, a proposer LM of its own) picks a candidate better than the student's, returns a
    ResilientModule whose instruction and demos are sent, and a call of the result is still retried. The metric
    rewards the proposed instruction and labeled demos in the prompt just sent (one thread: the last prompt is the
    evaluated call's)."""
    pytest.importorskip("optuna")
    proposed = "Answer the question in the house style."
    lm = FaultInjectingLM()
    proposer = FaultInjectingLM("fault/propose", answers=lambda question: proposed)

    def metric(example: Any, prediction: Any, trace: Any = None) -> float:
        messages = sent_messages(lm)
        return ((proposed in messages) + ("train question" in messages)) / 2

    optimizer = dspy.MIPROv2(
        metric=metric,
        prompt_model=proposer,
        task_model=lm,
        auto=None,
        num_candidates=2,
        max_bootstrapped_demos=0,
        max_labeled_demos=2,
        num_threads=1,
    )
    module = resilient().as_module()
    student = module.predictors()[0]
    valset = [dspy.Example(question=f"held-out question {i}", answer="x").with_inputs("question") for i in range(2)]
    with dspy.context(lm=lm):
        compiled = optimizer.compile(
            module, trainset=TRAIN, valset=valset, num_trials=4, minibatch=False, requires_permission_to_run=False
        )
        lm.push("server_error")
        before = lm.requests
        assert compiled(question="after MIPROv2").answer
    assert isinstance(compiled, ResilientModule) and lm.requests == before + 2
    (predictor,) = compiled.predictors()
    instructions = predictor.signature.instructions
    assert (instructions, len(predictor.demos)) != (student.signature.instructions, 0)  # the search chose a candidate
    assert student.demos == [] and proposer.requests > 0
    messages = sent_messages(lm)
    assert instructions in messages
    assert all(str(demo.question) in messages and str(demo.answer) in messages for demo in predictor.demos)
    module.pipeline.portal.close()


# --- save and load -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".json", ".pkl"])
def test_save_and_load_round_trip_the_wrapped_programs_state(tmp_path: Path, suffix: str) -> None:
    """A compiled module's state saves to JSON or pickle and loads into a new module, and into the bare program (and
    back): the names are the program's own."""
    compiled = dspy.LabeledFewShot(k=2).compile(resilient().as_module(), trainset=TRAIN)
    path = tmp_path / f"program{suffix}"
    compiled.save(str(path))
    loaded = resilient().as_module()
    loaded.load(str(path), allow_pickle=True)
    bare = dspy.Predict("question -> answer")
    bare.load(str(path), allow_pickle=True)
    expected = [dict(demo.items()) for demo in compiled.predictors()[0].demos]
    assert [dict(demo.items()) for demo in loaded.predictors()[0].demos] == expected
    assert [dict(demo.items()) for demo in bare.demos] == expected
    lm = FaultInjectingLM()
    with dspy.context(lm=lm):
        loaded(question="after loading")
    assert all(demo["question"] in sent_messages(lm) for demo in expected)
    loaded.pipeline.portal.close()


def test_a_whole_program_pickle_is_refused_with_a_reason(tmp_path: Path) -> None:
    """Live layer state cannot be pickled: save_program=True and pickle.dumps fail at once instead of writing a
    file that cannot work; the state (above) or the wrapped program can be saved."""
    module = resilient().as_module()
    with pytest.raises(TypeError):
        pickle.dumps(module)
    with pytest.raises(RuntimeError):
        module.save(str(tmp_path / "whole"), save_program=True)
    module.program.save(str(tmp_path / "program"), save_program=True)
    assert (tmp_path / "program" / "program.pkl").exists()


# --- Evaluate and Parallel from many threads ---------------------------------------------------------------------


@pytest.mark.parametrize("runner", ["evaluate", "parallel"])
def test_eight_threads_keep_the_rate_limit_exact(runner: str) -> None:
    """dspy.Evaluate(num_threads=8) and dspy.Parallel(num_threads=8) through as_module(): the 40 calls from 8
    threads share the limiter on one loop, and no 0.2 s window holds more than 5 admissions."""
    lm = FaultInjectingLM()
    admitted: list[float] = []

    class Admissions:
        """Right below the limiter: when each call was admitted, on the pipeline's clock."""

        async def __call__(self, call: Call, next: Handler) -> Any:
            admitted.append(call.clock.now())
            return await next(call)

    module = resilient(None, RateLimiter(requests=5, per=0.2, max_wait=30), Admissions()).as_module()
    devset = [dspy.Example(question=f"q{i}", answer="x").with_inputs("question") for i in range(40)]
    with dspy.context(lm=lm):
        if runner == "evaluate":
            evaluate = dspy.Evaluate(devset=devset, metric=lambda *args, **kwargs: 1.0, num_threads=8, max_errors=100)
            assert evaluate(module).score == 100.0
        else:
            answers = dspy.Parallel(num_threads=8).forward([(module, example.inputs()) for example in devset])
            assert all(answer.answer for answer in answers)
    assert lm.requests == 40
    assert len(admitted) == 40 and limiter_respected(admitted, [Limit(amount=5, per=0.2)]) == []
    module.pipeline.portal.close()


class Flaky(dspy.Module):  # type: ignore[misc]
    """Fails its first ``failures`` calls, then answers after a short pause; records each run's start."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.failures = failures
        self.starts: list[float] = []

    async def aforward(self, question: str) -> dspy.Prediction:
        self.starts.append(time.monotonic())
        if len(self.starts) <= self.failures:
            raise dspy.LMServerError("injected", status=503)
        await asyncio.sleep(0.01)
        return dspy.Prediction(answer=question)


@pytest.mark.parametrize("runner", ["evaluate", "parallel"])
def test_the_breaker_holds_across_threads_no_run_while_open_at_most_one_probe_while_half_open(runner: str) -> None:
    """dspy.Evaluate(num_threads=8) and dspy.Parallel(num_threads=8) call the module from many threads. The
    breaker opens after 2 failures; while it is open no call reaches the program, and while half-open at most one
    trial runs (half_open_probes=1), however many threads call."""
    program = Flaky(failures=2)
    heard: list[Event] = []
    breaker = CircuitBreaker(failure_threshold=2, break_duration=0.05)
    module = Pipeline(program, breaker, listeners=[heard.append]).as_module()
    examples = [dspy.Example(question=f"q{i}", answer="x").with_inputs("question") for i in range(60)]
    if runner == "evaluate":
        dspy.Evaluate(devset=examples, metric=lambda *a, **k: 1.0, num_threads=8, max_errors=1000)(module)
    else:
        dspy.Parallel(num_threads=8, max_errors=1000).forward([(module, ex.inputs()) for ex in examples])
    changes = [event for event in heard if isinstance(event, CircuitStateChanged)]
    assert changes and changes[0].new is CircuitState.OPEN
    for index, change in enumerate(changes):
        until = changes[index + 1].time if index + 1 < len(changes) else float("inf")
        runs = [start for start in program.starts if change.time < start < until]
        if change.new is CircuitState.OPEN:
            assert runs == []
        elif change.new is CircuitState.HALF_OPEN:
            assert len(runs) <= 1
    module.pipeline.portal.close()


# --- composition -------------------------------------------------------------------------------------------------


async def test_a_module_wrapped_pipeline_inside_another_pipeline_counts_its_attempts() -> None:
    """Pipeline(inner.as_module(), ...): the outer runs the inner module through acall, on the same loop; the
    inner's Retry retries, and the outer sees one answer."""
    lm = FaultInjectingLM(script=["server_error"])
    outer = Pipeline(resilient().as_module(), Timeout(60))
    with dspy.context(lm=lm):
        outcome = await outer.invoke(question="nested")
    assert outcome.value.answer and lm.requests == 2


async def test_a_pipeline_inside_another_modules_aforward_and_usage_and_history_still_work(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A module whose aforward awaits a module-wrapped pipeline: usage is tracked (get_lm_usage) and
    dspy.inspect_history shows the prompt."""

    class Outer(dspy.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.inner = resilient().as_module()

        async def aforward(self, question: str) -> Any:
            return await self.inner.acall(question=question)

    lm = FaultInjectingLM()
    with dspy.context(lm=lm, track_usage=True):
        prediction = await Outer().acall(question="how much?")
    (entry,) = lm.journal
    usage = prediction.get_lm_usage()[lm.model]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (entry.input_tokens, entry.output_tokens)
    dspy.inspect_history(n=1)
    assert "how much?" in capsys.readouterr().out


def test_usage_is_tracked_for_a_sync_call() -> None:
    lm = FaultInjectingLM()
    module = resilient().as_module()
    with dspy.context(lm=lm, track_usage=True):
        prediction = module(question="sync usage")
    (entry,) = lm.journal
    assert prediction.get_lm_usage()[lm.model]["completion_tokens"] == entry.output_tokens
    module.pipeline.portal.close()
