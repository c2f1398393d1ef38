"""The RateLimiter on a shared RedisStore: its cost per call, and 4 processes against one provider quota, next to
LiteLLM's Router with Redis and ``rpm`` set, in one run.

Run ``python benchmarks/bench_redis.py [--quick | --smoke] [--json out.json]`` (about 4 minutes; ``--quick`` about
90 s). It uses ``RESILIENT_DSPY_REDIS_URL`` or starts ``redis-server`` on a free loopback port; with neither it
prints that it skipped and exits 0. Two parts:

- **overhead**: one caller, sequential calls through ``Pipeline(noop, RateLimiter(requests=10**9))`` in memory and
  on the RedisStore (counted from admission: one step per call; from the answer, the default: the admission and
  the answer's step), and a bare redis-py ``PING`` (the floor), in paired rounds of one run; µs per call, and per
  call the round trips (EVALSHA calls counted by the server's ``INFO commandstats``) and every command the server
  ran (the script's own included).
- **quota**: the chaos server with ``Quota(requests_per_minute=600, window=60)`` (the window scaled by ``--scale``
  for ours: 60 per 6 s by default, the same rate), 4 worker processes of 10 callers each looping for ``--windows``
  windows. *ours-answer*: ``RateLimiter(requests=quota, per=window, store=RedisStore)`` (counted from the answer,
  the default: no margin, no pacing). *ours*: the same ``counts_from="admission"`` with ``per=window * 1.01`` (1 %
  margin for the transit to the server); *ours-paced* adds a pacing bucket to that. LiteLLM:
  ``Router(model_list=[{... "rpm": 600}], redis_host=, redis_port=, routing_strategy="usage-based-routing-v2",
  num_retries=0)`` on the real minute (it counts per calendar minute, so its window cannot be scaled); a call the
  Router refuses itself is retried by the worker after 50 ms. From the chaos server's journal: requests that got a
  429 (target 0), and utilisation = answered requests / (quota x windows run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

QUOTA = 600  # requests per window (a minute)
WORKERS = 4
CALLERS = 10
MARGIN = 1.01


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def redis_url() -> Iterator[str | None]:
    """``RESILIENT_DSPY_REDIS_URL``, else a redis-server started here (stopped after), else None."""
    given = os.environ.get("RESILIENT_DSPY_REDIS_URL")
    binary = shutil.which("redis-server")
    if given or binary is None:
        yield given
        return
    port, workdir = free_port(), tempfile.mkdtemp(prefix="bench-redis-")
    command = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no"]
    process = subprocess.Popen([*command, "--dir", workdir], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    yield None
                    return
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.terminate()
        process.wait(timeout=10)
        shutil.rmtree(workdir, ignore_errors=True)


# ------------------------------------------------------------------------------------------------ overhead


async def overhead(url: str, calls: int, rounds: int) -> dict[str, float]:
    """µs per call in memory and on Redis (medians of paired rounds), and Redis commands per call."""
    from redis.asyncio import Redis

    from resilient_dspy import Pipeline, RedisStore
    from resilient_dspy.middleware.ratelimit import RateLimiter

    async def noop(question: str) -> str:
        return question

    store = RedisStore(url, prefix=f"bench-{uuid.uuid4().hex[:8]}")
    memory = Pipeline(noop, RateLimiter(requests=10**9, per=1.0))
    shared = Pipeline(noop, RateLimiter(requests=10**9, per=1.0, store=store, counts_from="admission", name="a"))
    answer = Pipeline(noop, RateLimiter(requests=10**9, per=1.0, store=store, name="b"))
    bare = Pipeline(noop)
    await shared(question="warm")  # loads the scripts
    await answer(question="warm")
    admin = Redis.from_url(url)

    async def per_call(pipeline: Pipeline) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await pipeline(question="q")
        return (time.perf_counter() - started) / calls * 1e6

    async def counted() -> tuple[int, int]:
        """(round trips: EVALSHA + EVAL + SCRIPT calls, every command the server ran, scripts' inner ones too)."""
        stats = await admin.info("commandstats")
        trips = sum(
            int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("evalsha", "eval", "script|load")
        )
        return trips, sum(int(value.get("calls", 0)) for value in stats.values())

    async def ping() -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await admin.ping()
        return (time.perf_counter() - started) / calls * 1e6

    results: dict[str, list[float]] = {"bare": [], "memory": [], "redis": [], "answer": [], "ping": []}
    trips = {"redis": 0, "answer": 0}
    commands = {"redis": 0, "answer": 0}
    for _ in range(rounds):
        results["bare"].append(await per_call(bare))
        results["memory"].append(await per_call(memory))
        results["ping"].append(await ping())
        for name, pipeline in (("redis", shared), ("answer", answer)):
            trips_before, commands_before = await counted()
            results[name].append(await per_call(pipeline))
            trips_after, commands_after = await counted()
            trips[name] += trips_after - trips_before
            commands[name] += commands_after - commands_before - 1  # the first INFO is counted in the second
    await admin.aclose()
    await store.aclose()
    med = {name: sorted(values)[len(values) // 2] for name, values in results.items()}
    return {
        "memory_us": med["memory"] - med["bare"],
        "redis_us": med["redis"] - med["bare"],
        "answer_us": med["answer"] - med["bare"],
        "ping_us": med["ping"],
        "round_trips_per_call": trips["redis"] / (calls * rounds),
        "server_commands_per_call": commands["redis"] / (calls * rounds),
        "answer_round_trips_per_call": trips["answer"] / (calls * rounds),
        "answer_server_commands_per_call": commands["answer"] / (calls * rounds),
    }


# ------------------------------------------------------------------------------------------------ quota run


async def run_quota(
    contender: str, url: str, window: float, windows: float, quota: int, workers: int = WORKERS
) -> dict[str, Any]:
    """4 workers of ``contender`` against a fresh chaos server with ``quota`` per ``window``; its journal's figures."""
    from resilient_dspy.testing.chaos_server import ChaosServer, Quota

    prefix = f"bench-{uuid.uuid4().hex[:8]}"
    async with ChaosServer(quota=Quota(requests_per_minute=quota, window=window)) as server:
        args = ["--worker", contender, "--redis", url, "--prefix", prefix, "--target", server.url]
        args += ["--window", str(window), "--quota", str(quota), "--seconds", str(window * windows)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), ROOT]))}
        workers = [
            await asyncio.create_subprocess_exec(
                sys.executable, __file__, *args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
            )
            for _ in range(workers)
        ]
        try:
            for worker in workers:
                assert worker.stdout is not None
                line = await asyncio.wait_for(worker.stdout.readline(), 120)
                if line.strip() != b"ready":
                    raise RuntimeError(f"{contender} worker did not start: {line!r}")
            started = asyncio.get_running_loop().time()
            for worker in workers:
                assert worker.stdin is not None
                worker.stdin.write(b"go\n")
                await worker.stdin.drain()
            outputs = [await asyncio.wait_for(worker.communicate(), window * windows + 120) for worker in workers]
        finally:
            for worker in workers:
                if worker.returncode is None:
                    worker.kill()
                    await worker.wait()
        journal = [entry for entry in server.journal if entry.time >= started]
    reports = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    answered = sum(1 for entry in journal if entry.status == 200)
    got_429 = sum(1 for entry in journal if entry.status == 429)
    return {
        "contender": contender,
        "quota": f"{quota} per {window:g}s",
        "seconds": window * windows,
        "answered": answered,
        "429": got_429,
        "utilisation": answered / (quota * windows),
        "refused_by_client": sum(r["refused"] for r in reports),
    }


async def worker(options: argparse.Namespace) -> None:
    """One worker process: ``CALLERS`` callers loop for ``--seconds`` through ours or LiteLLM's Router."""
    refused = 0
    if options.worker.startswith("ours"):
        import aiohttp

        from resilient_dspy import Pipeline, RedisStore
        from resilient_dspy.middleware.ratelimit import Limit, RateLimiter

        store = RedisStore(options.redis, prefix=options.prefix, timeout=1.0)
        session = aiohttp.ClientSession()

        async def program(question: str) -> int:
            body = {"model": "chaos", "messages": [{"role": "user", "content": question}]}
            async with session.post(f"{options.target}/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        if options.worker == "ours-answer":  # held until each answer: the provider's window, no margin
            limiter = RateLimiter(Limit.requests(options.quota, per=options.window), store=store, name="quota")
        else:
            limits = [Limit.requests(options.quota, per=options.window * MARGIN)]
            if options.worker == "ours-paced":  # the same rate, spread evenly: no burst at each window's start
                limits.append(Limit.requests(options.quota, per=options.window, burst=max(1, options.quota // 10)))
            limiter = RateLimiter(*limits, store=store, name="quota", counts_from="admission")
        pipeline = Pipeline(program, limiter)

        async def one(question: str) -> None:
            await pipeline(question=question)

    else:
        import litellm
        from redis import Redis

        address = Redis.from_url(options.redis).connection_pool.connection_kwargs
        deployment = {
            "model_name": "chaos",
            "litellm_params": {
                "model": "openai/chaos",
                "api_base": f"{options.target}/v1",
                "api_key": "chaos",
                "rpm": options.quota,
            },
        }
        router = litellm.Router(
            model_list=[deployment],
            redis_host=address["host"],
            redis_port=address["port"],
            routing_strategy="usage-based-routing-v2",
            num_retries=0,
        )

        async def one(question: str) -> None:
            nonlocal refused
            try:
                await router.acompletion(model="chaos", messages=[{"role": "user", "content": question}])
            except Exception:  # a 429 from the server or the Router's own refusal: the journal tells them apart
                refused += 1
                await asyncio.sleep(0.05)

    print("ready", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    end = time.monotonic() + options.seconds

    async def caller(index: int) -> None:
        step = 0
        while time.monotonic() < end:
            remaining = end - time.monotonic()
            try:
                await asyncio.wait_for(one(f"{index}-{step}"), max(0.01, remaining))
            except TimeoutError:
                return
            step += 1

    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    if options.worker.startswith("ours"):
        await session.close()
        await store.aclose()
    print(json.dumps({"refused": refused}), flush=True)


ROOT = str(Path(__file__).resolve().parent.parent)


async def main(args: argparse.Namespace) -> dict[str, Any]:
    with redis_url() as url:
        if url is None:
            print("bench_redis: skipped: no redis-server (set RESILIENT_DSPY_REDIS_URL or install redis-server)")
            return {}
        calls, rounds = (50, 2) if args.smoke else (1000, 5) if args.quick else (2000, 9)
        result: dict[str, Any] = {"overhead": await overhead(url, calls, rounds)}
        o = result["overhead"]
        print(f"overhead per call: in memory {o['memory_us']:.1f} µs; on Redis counted from admission ", end="")
        print(f"{o['redis_us']:.1f} µs, {o['round_trips_per_call']:.2f} round trips, ", end="")
        print(f"{o['server_commands_per_call']:.1f} server commands; from the answer {o['answer_us']:.1f} µs, ", end="")
        print(f"{o['answer_round_trips_per_call']:.2f} round trips, ", end="")
        print(
            f"{o['answer_server_commands_per_call']:.1f} server commands (a bare redis-py PING: {o['ping_us']:.1f} µs)"
        )
        if args.smoke:
            ours_window, litellm_window, windows = 1.0, 60.0, 1.0
            litellm_seconds: float = 2.0
        else:
            ours_window, litellm_window = 60.0 * args.scale, 60.0
            windows = 2.0 if args.quick else 3.0
            litellm_seconds = 60.0 if args.quick else 120.0
        ours_quota = 20 if args.smoke else max(1, round(QUOTA * args.scale))
        workers = 1 if args.smoke else WORKERS
        ours = ("ours-answer",) if args.smoke else ("ours-answer", "ours", "ours-paced")
        runs = [await run_quota(name, url, ours_window, windows, ours_quota, workers) for name in ours]
        runs.append(await run_quota("litellm", url, litellm_window, litellm_seconds / litellm_window, QUOTA, workers))
        result["quota"] = runs
        print("| limiter | quota | seconds | answered | got 429 | utilisation | refused by the client |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for run in runs:
            print(
                f"| {run['contender']} | {run['quota']} | {run['seconds']:g} | {run['answered']} | {run['429']} | "
                f"{run['utilisation']:.1%} | {run['refused_by_client']} |"
            )
        return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: checks the script runs (tests use it)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--scale", type=float, default=0.1, help="our quota window as a fraction of a minute")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--worker", choices=["ours-answer", "ours", "ours-paced", "litellm"])
    parser.add_argument("--redis")
    parser.add_argument("--prefix")
    parser.add_argument("--target")
    parser.add_argument("--window", type=float)
    parser.add_argument("--quota", type=int)
    parser.add_argument("--seconds", type=float)
    parsed = parser.parse_args()
    if parsed.worker:
        asyncio.run(worker(parsed))
    else:
        figures = asyncio.run(main(parsed))
        if parsed.json is not None:
            parsed.json.write_text(json.dumps(figures, indent=2))
