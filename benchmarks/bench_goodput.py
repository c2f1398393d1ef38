"""Goodput at the provider's quota: how close each client gets to the quota-bound wall time, and how many 429s it
provokes on the way.

Run ``python benchmarks/bench_goodput.py [--quick] [--smoke] [--json out.json] [--write-docs docs/benchmarks.md]``
(default ~10 min, ``--quick`` ~2 min, ``--smoke`` ~20 s). The provider is the project's chaos server in its own
process (real HTTP on 127.0.0.1), configured as a provider: a requests quota and a tokens quota over a sliding
window, 429 with Retry-After above them, and 5 % injected 500s. Each client sends the same 1,000 (``--quick``: 200)
distinct questions with the same concurrency, one after the other against a reset server; the figures come from
the server's journal:

- **wall**: first request to last answer; **quota-bound**: the earliest any client that never exceeds the quota can
  finish (``floor((requests_sent - 1) / rpm)`` windows, counting the 5 % that must be sent again);
- **utilisation**: quota-bound / wall (100 % = the physical limit);
- **429s**: requests the quota refused (target 0); **answered**: questions that got an answer.

Clients: ours, the recommended stack with the RateLimiter set to the quota (below Retry, as its page recommends for
a provider's quota; also above Retry, and counting from admission); LiteLLM's Router with ``rpm``/``tpm`` on the
deployment (``usage-based-routing-v2``, as DSPy users configure it), retrying on its own; tenacity retrying 429s and
5xx around ``dspy.Predict``; DSPy's own ``num_retries``.

The quota is a per-minute quota (600 requests a minute by default) that the provider enforces over 10-s windows (100
per 10 s), as providers may (OpenAI's rate-limit guide says a per-minute limit may be enforced over shorter
periods); so 1,000 requests span ten windows, and a client's burst in the first window weighs little. LiteLLM is
given the per-minute figures, the only unit it takes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import multiprocessing
import os
import platform
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import dspy

from resilient_dspy import CircuitBreaker, Limit, Pipeline, RateLimiter, Retry, Timeout

sys.path.insert(0, str(Path(__file__).resolve().parent))
from docs_section import write_section

Ask = Callable[[str], Awaitable[bool]]
MARK = "<!-- bench_goodput.py: this section is written by `python benchmarks/bench_goodput.py --write-docs` -->"
END = "<!-- /bench_goodput.py -->"
MAX_TOKENS = 64


@dataclass(frozen=True)
class Scale:
    requests: int
    rpm: int
    window: float
    concurrency: int


SCALES = {
    "default": Scale(requests=1000, rpm=100, window=10.0, concurrency=64),
    "quick": Scale(requests=200, rpm=50, window=5.0, concurrency=32),
    "smoke": Scale(requests=6, rpm=5, window=0.5, concurrency=3),
}


def serve(port_queue: Any, window: float) -> None:
    """The provider, in its own process: the chaos server with 5 % 500s (its quota is set per client run)."""
    from resilient_dspy.testing.chaos_server import ChaosServer

    async def run() -> None:
        async with ChaosServer(profile={"server_error": 0.05}, seed=7, max_hang=5.0) as server:
            port_queue.put(int(server.url.rsplit(":", 1)[1]))
            await asyncio.Event().wait()

    asyncio.run(run())


def control(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{base}{path}", data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def predictor(lm: dspy.LM) -> dspy.Predict:
    program = dspy.Predict("question -> answer")
    program.set_lm(lm)
    return program


def server_lm(api_base: str, **settings: Any) -> dspy.LM:
    options: dict[str, Any] = {"api_key": "chaos", "cache": False, "num_retries": 0, "max_tokens": MAX_TOKENS}
    return dspy.LM("openai/chaos", api_base=api_base, **{**options, **settings})


def ours(api_base: str, scale: Scale, tpm: int, *, per_attempt: bool, counts_from: str = "answer") -> Ask:
    """The recommended stack, the RateLimiter set to the provider's quota (both limits), outside or inside Retry."""
    limits = (Limit.requests(scale.rpm, scale.window), Limit.tokens(tpm, scale.window))
    limiter = RateLimiter(*limits, counts_from=counts_from, name="provider-quota")  # type: ignore[arg-type]
    attempt = [CircuitBreaker(failure_rate=0.5, window=50, min_calls=20), Timeout(30.0)]
    layers: list[Any] = [Timeout(600.0)]
    if per_attempt:
        layers += [Retry(8, base_delay=0.2, max_delay=5.0, max_retry_after=120.0), limiter, *attempt]
    else:
        layers += [limiter, Retry(8, base_delay=0.2, max_delay=5.0, max_retry_after=120.0), *attempt]
    pipeline = Pipeline(predictor(server_lm(api_base)), *layers)

    async def ask(question: str) -> bool:
        try:
            await pipeline(question=question)
        except Exception:
            return False
        return True

    return ask


def litellm_router(api_base: str, scale: Scale, tpm: int) -> Ask:
    """LiteLLM's Router with the quota on the deployment; it retries (and waits out cooldowns) on its own."""
    from litellm import Router

    per_minute = 60.0 / scale.window
    deployment = {
        "model_name": "chaos",
        "litellm_params": {"model": "openai/chaos", "api_base": api_base, "api_key": "chaos"},
        "rpm": int(scale.rpm * per_minute),
        "tpm": int(tpm * per_minute),
    }
    router = Router(model_list=[deployment], routing_strategy="usage-based-routing-v2", num_retries=8, retry_after=0.2)
    lm = server_lm(api_base)
    adapter = dspy.ChatAdapter()
    signature = dspy.Predict("question -> answer").signature

    async def ask(question: str) -> bool:
        messages = adapter.format(signature, demos=[], inputs={"question": question})
        try:
            response = await router.acompletion(model="chaos", messages=messages, max_tokens=MAX_TOKENS)
        except Exception:
            return False
        return bool(response.choices[0].message.content) and lm is not None

    return ask


def tenacity_retry(api_base: str) -> Ask:
    """``dspy.Predict`` inside tenacity: exponential backoff with jitter on 429 and 5xx, 8 retries."""
    from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

    program = predictor(server_lm(api_base))
    retryable = (dspy.LMRateLimitError, dspy.LMServerError, dspy.LMTransportError, dspy.LMTimeoutError)

    async def ask(question: str) -> bool:
        try:
            async for attempt in AsyncRetrying(
                stop=stop_after_attempt(9),
                wait=wait_exponential_jitter(multiplier=0.2, max=5.0),
                retry=retry_if_exception_type(retryable),
                reraise=True,
            ):
                with attempt:
                    await program.acall(question=question)
        except Exception:
            return False
        return True

    return ask


def dspy_retries(api_base: str) -> Ask:
    """``dspy.Predict`` on an LM with ``num_retries=8`` (LiteLLM's exponential backoff inside DSPy)."""
    program = predictor(server_lm(api_base, num_retries=8))

    async def ask(question: str) -> bool:
        try:
            await program.acall(question=question)
        except Exception:
            return False
        return True

    return ask


@dataclass(frozen=True)
class Row:
    client: str
    wall_s: float
    quota_bound_s: float
    utilisation: float
    sent: int
    rate_limited: int
    server_errors: int
    answered: int
    requests: int


async def drive(ask: Ask, scale: Scale, label: str) -> tuple[int, float]:
    """Send every question with bounded concurrency; the number answered and the wall time."""
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in range(scale.requests):
        queue.put_nowait(f"{label} question {i}: what limits a provider's throughput?")
    answered = 0

    async def worker() -> None:
        nonlocal answered
        while not queue.empty():
            if await ask(queue.get_nowait()):
                answered += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(scale.concurrency)))
    return answered, time.perf_counter() - started


def measure(base: str, name: str, ask: Ask, scale: Scale, tpm: int) -> Row:
    control(base, "/control/reset", {})
    control(base, "/control/faults", {"profile": {"server_error": 0.05}, "quota": quota(scale, tpm)})
    answered, wall = asyncio.run(drive(ask, scale, name))
    entries = control(base, "/control/journal")["entries"]
    limited = sum(1 for entry in entries if entry["status"] == 429 and "quota" in entry["detail"])
    errors = sum(1 for entry in entries if entry["status"] is not None and entry["status"] >= 500)
    reached = len(entries) - limited  # every request the quota admitted, the 5xx included
    bound = math.floor((reached - 1) / scale.rpm) * scale.window if reached else 0.0
    return Row(
        name, wall, bound, bound / wall if wall else 0.0, len(entries), limited, errors, answered, scale.requests
    )


def quota(scale: Scale, tpm: int) -> dict[str, Any]:
    return {"requests_per_minute": scale.rpm, "tokens_per_minute": tpm, "window": scale.window}


def tokens_per_request(base: str, api_base: str) -> int:
    """The prompt + completion tokens one DSPy request costs on this server (read from its journal)."""
    control(base, "/control/reset", {})
    control(base, "/control/faults", {"profile": {}, "quota": None})
    asyncio.run(predictor(server_lm(api_base)).acall(question="tokens question 0: what limits a provider?"))
    entry = control(base, "/control/journal")["entries"][-1]
    return int(entry["input_tokens"]) + int(entry["output_tokens"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 requests against 100 per 10 s")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--only", nargs="*", help="run only these clients (by name prefix)")
    parser.add_argument("--write-docs", type=Path, help="write the table into this file's goodput section")
    args = parser.parse_args()
    scale = SCALES["smoke" if args.smoke else "quick" if args.quick else "default"]
    logging.getLogger("LiteLLM").setLevel(logging.ERROR)
    logging.getLogger("LiteLLM Router").setLevel(logging.ERROR)
    context = multiprocessing.get_context("spawn")
    ports = context.Queue()
    provider = context.Process(target=serve, args=(ports, scale.window), daemon=True)
    provider.start()
    try:
        port = ports.get(timeout=60)
        base, api_base = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{port}/v1"
        per_request = tokens_per_request(base, api_base)
        tpm = per_request * scale.rpm * 5 // 4  # binding only if a client overshoots the requests quota by 25 %
        clients: dict[str, Callable[[], Ask]] = {
            "resilient_dspy, limiter per attempt": lambda: ours(api_base, scale, tpm, per_attempt=True),
            "resilient_dspy, limiter outside Retry": lambda: ours(api_base, scale, tpm, per_attempt=False),
            "resilient_dspy, limiter per attempt, counted from admission": lambda: ours(
                api_base, scale, tpm, per_attempt=True, counts_from="admission"
            ),
            "LiteLLM Router (rpm/tpm)": lambda: litellm_router(api_base, scale, tpm),
            "tenacity around dspy.Predict": lambda: tenacity_retry(api_base),
            "DSPy num_retries=8": lambda: dspy_retries(api_base),
        }
        rows = []
        for name, make in clients.items():
            if args.only and not any(name.startswith(prefix) for prefix in args.only):
                continue
            row = measure(base, name, make(), scale, tpm)
            rows.append(row)
            print(f"  {name}: {row.answered}/{row.requests} answered, {row.wall_s:.1f} s", file=sys.stderr)
    finally:
        provider.terminate()
        provider.join(10)
    lines = render(rows, scale, tpm, per_request, sys.argv[1:])
    print("\n".join(lines))
    if args.json:
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))
    if args.write_docs:
        write_section(args.write_docs, MARK, END, lines)
        print(f"Wrote {args.write_docs}")


def render(rows: list[Row], scale: Scale, tpm: int, per_request: int, argv: list[str]) -> list[str]:
    """The docs section: what was run, on what, and the table."""
    kept = [a for a in argv if a not in ("--write-docs", "--json") and not a.endswith((".md", ".json"))]
    shown = " ".join(["python", "benchmarks/bench_goodput.py", *kept])
    lines = [
        MARK,
        "",
        "## Goodput at the provider's quota",
        "",
        f"`{shown}` on Python {platform.python_version()}, "
        f"{os.cpu_count()} cores: {scale.requests} distinct questions, {scale.concurrency} at a time, against the "
        f"chaos server in its own process as a provider with a quota of {scale.rpm} requests and {tpm} tokens per "
        f"{scale.window:g} s (sliding), 429 + Retry-After above it, and 5 % injected 500s ({per_request} tokens a "
        "request). Quota-bound: the earliest a client that never exceeds the quota could finish (counting every "
        "request the quota admitted, the 500s included).",
        "",
        "| client | answered | wall s | quota-bound s | utilisation | requests sent | 429s | 5xx |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row.client} | {row.answered}/{row.requests} | {row.wall_s:.1f} | {row.quota_bound_s:.1f} | "
            f"{row.utilisation:.1%} | {row.sent} | {row.rate_limited} | {row.server_errors} |"
        )
    return [*lines, "", END]


if __name__ == "__main__":
    main()
