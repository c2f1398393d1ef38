"""The chaos server over real HTTP: a real ``dspy.LM("openai/...")`` against 127.0.0.1, each fault mapped to DSPy's
error class, pipelines that recover, quotas, the control API, clean shutdown and the CLI.

These tests run on real time (``looptime(False)``): the server and the client talk over real sockets. They stay
short: Retry-After values are tens of milliseconds, hangs end at a per-attempt Timeout, and every request count is
bounded by a script.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import dspy
import pytest

from resilient_dspy import Pipeline, RetriesExhaustedError, Retry, Timeout, TimeoutExceededError
from resilient_dspy.cli import main
from resilient_dspy.errors import ConfigurationError, ResilienceWarning
from resilient_dspy.events import Event, RetryScheduled
from resilient_dspy.testing import ChaosServer, Fault, FaultStep, Quota, fault_error
from tests.conftest import other_tasks

pytestmark = pytest.mark.looptime(False)

ROOT = Path(__file__).parent.parent.parent


@pytest.fixture
async def server() -> AsyncIterator[ChaosServer]:
    async with ChaosServer(port=0, max_hang=5.0) as running:
        yield running
    assert not other_tasks()


@pytest.fixture
async def lm(server: ChaosServer) -> AsyncIterator[dspy.LM]:
    """A real OpenAI-dialect LM pointed at the server, with DSPy's cache and retries off."""
    client = dspy.LM("openai/chaos", api_base=server.url + "/v1", api_key="x", cache=False, num_retries=0)
    yield client
    await client.aclose()


def resilient(program: Any = None, attempts: int = 4) -> Pipeline:
    return Pipeline(
        program or dspy.Predict("question -> answer"),
        Timeout(10.0),
        Retry(attempts, base_delay=0.01, max_delay=0.05, max_retry_after=1.0),
        Timeout(1.0),
    )


async def ask(lm: dspy.LM, question: str = "What is DSPy?", adapter: dspy.Adapter | None = None) -> Any:
    with dspy.context(lm=lm, adapter=adapter or dspy.ChatAdapter()):
        return await dspy.Predict("question -> answer").acall(question=question)


async def settled(server: ChaosServer) -> None:
    """Wait (at most 2 s) until the server has finished every request, e.g. noticed a client that went away."""
    for _ in range(200):
        if server.in_flight == 0:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{server.in_flight} request(s) still in flight")


# ------------------------------------------------------------------------------------ answers over real HTTP


async def test_answers_in_chat_format_with_usage(server: ChaosServer, lm: dspy.LM) -> None:
    """A fault-free request answers in DSPy's Chat format; DSPy parses it and sees the usage the server reported."""
    with dspy.context(lm=lm, track_usage=True):
        prediction = await dspy.Predict("question -> answer, confidence: float").acall(question="What is DSPy?")
    assert prediction.answer.startswith("A local answer #") and prediction.answer.endswith("What is DSPy?")
    assert 0 <= prediction.confidence < 1
    (entry,) = server.journal
    assert (entry.fault, entry.status, entry.adapter, entry.question) == (Fault.OK, 200, "chat", "What is DSPy?")
    usage = prediction.get_lm_usage()["openai/chaos"]
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (entry.input_tokens, entry.output_tokens)


@pytest.mark.parametrize("model", ["chaos", "gpt-4o-mini"])
async def test_answers_the_json_adapter_with_or_without_response_format(server: ChaosServer, model: str) -> None:
    """Under the JSON adapter the answer is JSON: from the response_format schema (gpt-4o-mini) or from the prompt."""
    client = server.lm(model)
    try:
        with dspy.context(lm=client, adapter=dspy.JSONAdapter()):
            prediction = await dspy.Predict("question -> answer, count: int").acall(question="How many?")
    finally:
        await client.aclose()
    assert isinstance(prediction.count, int) and prediction.answer.endswith("How many?")
    assert [(e.adapter, e.model) for e in server.journal] == [("json", model)]


# ------------------------------------------------------------------------- each HTTP fault → DSPy's error class

MAPPING = [
    (FaultStep("rate_limit", retry_after=0.05), dspy.LMRateLimitError, 429),
    (FaultStep("server_error"), dspy.LMServerError, 503),
    (FaultStep("server_error", status=500), dspy.LMServerError, 500),
    (FaultStep("server_error", status=502), dspy.LMServerError, 502),
    (FaultStep("timeout"), dspy.LMTimeoutError, 504),
    (FaultStep("transport"), dspy.LMTransportError, None),
    (FaultStep("invalid_json"), dspy.LMProviderError, 200),
    (FaultStep("context_window"), dspy.ContextWindowExceededError, 400),
    (FaultStep("auth"), dspy.LMAuthError, 401),
]


@pytest.mark.parametrize(("step", "error", "status"), MAPPING, ids=lambda v: getattr(v, "fault", None) or None)
async def test_each_http_fault_maps_to_its_dspy_error(
    server: ChaosServer, lm: dspy.LM, step: FaultStep, error: type[Exception], status: int | None
) -> None:
    """Each fault reaches the caller as exactly DSPy's class for it, with the HTTP status; the same class as Chaos."""
    server.script(step)
    with pytest.raises(dspy.LMError) as raised:
        await ask(lm)
    assert type(raised.value) is error
    assert raised.value.status == status
    assert type(raised.value) is type(fault_error(step.fault))
    if step.fault is Fault.RATE_LIMIT:
        assert raised.value.retry_after == 0.05  # from the Retry-After header
    else:
        assert raised.value.retry_after is None
    (entry,) = server.journal
    assert entry.fault is step.fault


async def test_a_malformed_answer_is_a_parse_error_after_the_json_fallback(server: ChaosServer, lm: dspy.LM) -> None:
    """An answer without markers fails the Chat adapter, then its JSON fallback: AdapterParseError after 2 requests."""
    server.script("malformed", "malformed")
    with pytest.raises(dspy.AdapterParseError):
        await ask(lm)
    assert [(e.fault, e.adapter) for e in server.journal] == [(Fault.MALFORMED, "chat"), (Fault.MALFORMED, "json")]


async def test_a_hang_ends_when_the_client_gives_up(server: ChaosServer, lm: dspy.LM) -> None:
    """A hang never answers: the attempt Timeout fires, the client drops the connection and the server sees it."""
    server.script("hang")
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(0.3))
    with dspy.context(lm=lm), pytest.raises(TimeoutExceededError):
        await pipeline("Anyone there?")
    await settled(server)
    (entry,) = server.journal
    assert entry.fault is Fault.HANG and entry.detail.startswith("client gave up after")


# --------------------------------------------------------------------------------------- pipelines recovering


async def test_the_pipeline_recovers_from_transient_faults(server: ChaosServer, lm: dspy.LM) -> None:
    """A 429 (Retry-After 0.05 s), a 503 and a dropped connection: Retry walks through all three and answers."""
    server.script(FaultStep("rate_limit", retry_after=0.05), "server_error", "transport")
    events: list[Event] = []
    pipeline = resilient()
    pipeline.subscribe(events.append)
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke("What is DSPy?")
    assert outcome.value.answer.endswith("What is DSPy?")
    assert outcome.retries == 3
    scheduled = [e for e in events if isinstance(e, RetryScheduled)]
    assert [e.reason for e in scheduled] == ["LMRateLimitError", "LMServerError", "LMTransportError"]
    assert scheduled[0].delay >= 0.05  # Retry-After honoured
    assert [e.fault for e in server.journal] == [
        Fault.RATE_LIMIT,
        Fault.SERVER_ERROR,
        Fault.TRANSPORT,
        Fault.OK,
    ]


async def test_the_pipeline_recovers_from_a_hang_and_from_malformed_answers(server: ChaosServer, lm: dspy.LM) -> None:
    """A hang costs one attempt timeout; two malformed answers cost one parse-error retry (cache bypassed)."""
    server.script("hang", "malformed", "malformed")
    with dspy.context(lm=lm):
        outcome = await resilient().invoke("Still there?")
    assert outcome.retries == 2
    assert [e.fault for e in server.journal] == [Fault.HANG, Fault.MALFORMED, Fault.MALFORMED, Fault.OK]


@pytest.mark.parametrize(
    ("kind", "error"), [("context_window", dspy.ContextWindowExceededError), ("auth", dspy.LMAuthError)]
)
async def test_permanent_faults_are_not_retried(
    server: ChaosServer, lm: dspy.LM, kind: str, error: type[Exception]
) -> None:
    """A context-window or auth error reaches the caller unchanged after exactly one request."""
    server.script(kind)
    with dspy.context(lm=lm), pytest.raises(error):
        await resilient()("What is DSPy?")
    assert server.requests == 1


async def test_a_full_outage_exhausts_the_attempts(server: ChaosServer, lm: dspy.LM) -> None:
    """Every request a 503 (a profile, not a script): RetriesExhaustedError after exactly max_attempts requests."""
    server.set_profile({"server_error": 1.0})
    with dspy.context(lm=lm), pytest.raises(RetriesExhaustedError) as raised:
        await resilient(attempts=3)("What is DSPy?")
    assert isinstance(raised.value.last_error, dspy.LMServerError)
    assert server.requests == 3


# ---------------------------------------------------------------------------------------------------- quotas


async def test_a_requests_quota_answers_429_with_the_time_until_a_slot_frees(server: ChaosServer, lm: dspy.LM) -> None:
    """Two requests per minute: the third is a 429 whose Retry-After is the rest of the minute."""
    server.set_quota(Quota(requests_per_minute=2))
    await ask(lm)
    await ask(lm)
    with pytest.raises(dspy.LMRateLimitError) as raised:
        await ask(lm)
    assert raised.value.retry_after is not None and 50 < raised.value.retry_after <= 60
    assert [e.detail for e in server.journal] == ["", "", "requests_per_minute quota"]


async def test_a_tokens_quota_is_recovered_from_by_retry_after(server: ChaosServer, lm: dspy.LM) -> None:
    """A tokens quota over a 0.2 s window: the second call is refused, Retry waits its Retry-After, then answers."""
    server.set_quota({"tokens_per_minute": 200, "window": 0.2})
    with dspy.context(lm=lm):
        await resilient()("first")
        outcome = await resilient().invoke("second")
    assert outcome.retries >= 1
    details = [e.detail for e in server.journal]
    assert details[0] == "" and details[-1] == "" and "tokens_per_minute quota" in details[1:-1]
    refused = [e for e in server.journal if e.detail]
    assert all(e.status == 429 and e.retry_after is not None and 0 < e.retry_after <= 0.2 for e in refused)


# ---------------------------------------------------------------------------------------------- control API


async def post(session: aiohttp.ClientSession, url: str, body: Any) -> tuple[int, Any]:
    async with session.post(url, json=body) as response:
        return response.status, await response.json()


async def test_the_control_api_scripts_sets_profiles_reads_the_journal_and_resets(server: ChaosServer) -> None:
    """POST /control/faults scripts and sets rates, GET /control/journal reads, POST /control/reset clears."""
    completion = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"{server.url}/health") as response:
            assert (response.status, await response.json()) == (200, {"status": "ok", "pending": 0, "requests": 0})
        status, state = await post(session, f"{server.url}/control/faults", {"script": ["auth", None]})
        assert status == 200 and [step["fault"] for step in state["script"]] == ["auth", "ok"]
        statuses = []
        for _ in range(2):
            async with session.post(f"{server.url}/v1/chat/completions", json=completion) as response:
                statuses.append(response.status)
        status, _ = await post(session, f"{server.url}/control/faults", {"profile": {"server_error": 1.0}})
        async with session.post(f"{server.url}/v1/chat/completions", json=completion) as response:
            statuses.append(response.status)
        assert statuses == [401, 200, 503]

        async with session.get(f"{server.url}/control/journal") as response:
            entries = (await response.json())["entries"]
        assert [(e["fault"], e["status"], e["question"]) for e in entries] == [
            ("auth", 401, "hi"),
            ("ok", 200, "hi"),
            ("server_error", 503, "hi"),
        ]
        status, state = await post(session, f"{server.url}/control/reset", {})
        assert status == 200 and state["profile"]["server_error"] == 0 and server.journal == []


async def test_the_guides_latency_range_is_accepted_over_http(server: ChaosServer) -> None:
    """The guide's ``{"profile": {"server_error": 0.2, "latency": [0.1, 0.5]}}``: JSON has lists, not tuples."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        body = {"profile": {"server_error": 0.2, "latency": [0.1, 0.5], "retry_after": [1, 2]}}
        status, state = await post(session, f"{server.url}/control/faults", body)
    assert status == 200, state
    assert state["profile"]["latency"] == [0.1, 0.5]
    assert server.schedule.profile.latency == (0.1, 0.5) and server.schedule.profile.retry_after == (1.0, 2.0)


async def test_the_fault_settings_read_back_post_back_unchanged(server: ChaosServer) -> None:
    """GET /control/faults answers exactly the body POST takes: POSTing it back is accepted and changes nothing."""
    server.script("auth", {"fault": "rate_limit", "retry_after": 0.5}, {"fault": "server_error", "status": 502}, None)
    server.set_profile({"server_error": 0.1, "latency": (0.0, 0.2), "retry_after": (1.0, 3.0)})
    server.set_quota(Quota(requests_per_minute=30, window=5.0))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        async with session.get(f"{server.url}/control/faults") as response:
            assert response.status == 200
            before = await response.json()
        status, answered = await post(session, f"{server.url}/control/faults", before)
        assert status == 200, answered
        async with session.get(f"{server.url}/control/faults") as response:
            after = await response.json()
    assert answered == before == after
    assert [step.fault for step in server.pending] == [Fault.AUTH, Fault.RATE_LIMIT, Fault.SERVER_ERROR, Fault.OK]
    assert server.schedule.profile.latency == (0.0, 0.2)


async def test_invalid_control_requests_change_nothing(server: ChaosServer) -> None:
    """A bad setting is a 400 listing every problem, and no part of the request is applied."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        status, body = await post(
            session,
            f"{server.url}/control/faults",
            {"script": ["auth", "explode"], "profile": {"server_error": 2}, "quota": {"window": 0}, "colour": 1},
        )
        assert status == 400
        fields = sorted(field for field, _ in body["error"]["problems"])
        assert fields == ["FaultProfile.server_error", "Quota.window", "body", "script"]
        async with session.post(f"{server.url}/control/faults", data=b"not json") as response:
            assert response.status == 400
        async with session.post(f"{server.url}/v1/chat/completions", json={"messages": []}) as response:
            assert response.status == 400
    assert server.pending == () and server.schedule.profile.server_error == 0


async def test_a_seeded_profile_gives_the_same_faults_on_every_run() -> None:
    """Two servers with the same seed and profile answer the same sequence of statuses; another seed differs."""

    async def statuses(seed: int) -> list[int]:
        profile = {"server_error": 0.3, "rate_limit": 0.2, "retry_after": (0.01, 0.02)}
        async with ChaosServer(profile=profile, seed=seed) as chaos, aiohttp.ClientSession() as session:
            out = []
            for _ in range(20):
                async with session.post(
                    f"{chaos.api_base}/chat/completions", json={"messages": [{"role": "user", "content": "x"}]}
                ) as response:
                    out.append(response.status)
            return out

    first, again, other = await statuses(3), await statuses(3), await statuses(4)
    assert first == again != other
    assert set(first) <= {200, 429, 503} and len(set(first)) == 3


# -------------------------------------------------------------------------------------------------- lifecycle


async def test_closing_ends_hanging_requests_and_leaves_no_task() -> None:
    """Closing with a request hanging drops its connection (the client sees LMTransportError) and leaves no task."""
    async with ChaosServer(script=["hang"], max_hang=30.0) as chaos:
        client = chaos.lm()
        call = asyncio.create_task(ask(client))
        for _ in range(200):
            if chaos.in_flight:
                break
            await asyncio.sleep(0.01)
        assert chaos.in_flight == 1
    with pytest.raises(dspy.LMTransportError):
        await call
    await client.aclose()
    assert chaos.journal[0].detail == "server closing; connection dropped"
    assert not other_tasks()


async def test_a_hang_is_bounded_by_max_hang_on_the_server() -> None:
    """A client that never gives up still gets an answer of sorts: after max_hang the connection is dropped."""
    async with ChaosServer(script=["hang"], max_hang=0.2) as chaos:
        client = chaos.lm(timeout=30)
        try:
            with pytest.raises(dspy.LMTransportError):
                await ask(client)
        finally:
            await client.aclose()
    assert chaos.journal[0].detail == "max_hang of 0.2s reached; connection dropped"


async def test_a_delay_is_cut_by_the_attempt_timeout(server: ChaosServer, lm: dspy.LM) -> None:
    """A scripted 5 s delay is cut by a 1 s attempt Timeout: the server sees the client leave, the retry answers."""
    server.script(FaultStep(latency=5.0))
    with pytest.warns(ResilienceWarning, match="total"):  # an attempt timeout with no total one: warned at build
        pipeline = Pipeline(dspy.Predict("question -> answer"), Retry(2, base_delay=0.01), Timeout(1.0))
    with dspy.context(lm=lm):
        outcome = await pipeline.invoke("slow?")
    assert outcome.retries == 1
    await settled(server)
    delayed, answered = sorted(server.journal, key=lambda e: e.latency, reverse=True)
    assert (delayed.latency, delayed.status) == (5.0, None)
    assert delayed.detail.startswith("client gave up during the delay after")
    assert (answered.fault, answered.latency, answered.status) == (Fault.OK, 0.0, 200)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.168.1.10", "example.com"])
def test_non_loopback_hosts_are_refused_unless_allowed(host: str) -> None:
    """Only loopback hosts are served by default; allow_remote=True is the explicit opt-in."""
    with pytest.raises(ConfigurationError) as raised:
        ChaosServer(host=host)
    assert [field for field, _ in raised.value.problems] == ["ChaosServer.host"]
    ChaosServer(host=host, allow_remote=True)
    for loopback in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        ChaosServer(host=loopback)


def test_bad_server_settings_are_reported_at_once() -> None:
    """Port, max_hang, script, profile and quota problems come in one ConfigurationError."""
    with pytest.raises(ConfigurationError) as raised:
        ChaosServer(port=70000, max_hang=0, script=["explode"], profile={"hang": 2}, quota={"requests_per_minute": 0})
    assert sorted(field for field, _ in raised.value.problems) == [
        "ChaosServer.max_hang",
        "ChaosServer.port",
        "ChaosServer.script",
        "FaultProfile.hang",
        "Quota.requests_per_minute",
    ]


# ------------------------------------------------------------------------------------------------------- CLI


def test_the_cli_refuses_a_non_loopback_host(capsys: pytest.CaptureFixture[str]) -> None:
    """`chaos-server --host 0.0.0.0` exits 2 with a message naming --allow-remote, without serving."""
    with pytest.raises(SystemExit) as raised:
        main(["chaos-server", "--host", "0.0.0.0"])
    assert raised.value.code == 2
    assert "--allow-remote" in capsys.readouterr().err


async def test_the_cli_serves_faults_until_interrupted() -> None:
    """`resilient-dspy chaos-server --port 0 --fault server_error=1` serves 503s, and Ctrl-C stops it cleanly."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "resilient_dspy.cli",
        "chaos-server",
        "--port",
        "0",
        "--fault",
        "server_error=1",
        cwd=ROOT,
        env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert process.stdout is not None
        first = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        url = first.decode().split()[-1]
        assert url.startswith("http://127.0.0.1:")
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session,
            session.post(
                f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
            ) as response,
        ):
            assert response.status == 503
        process.send_signal(signal.SIGINT)
        out, _ = await asyncio.wait_for(process.communicate(), timeout=10)
        assert process.returncode == 0
        assert b"chaos server stopped" in out
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
