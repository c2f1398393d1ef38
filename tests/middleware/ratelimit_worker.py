"""One worker process of the multi-process RateLimiter test: ``calls`` chat completions to the chaos server, through
a RateLimiter shared on Redis, ``concurrency`` at a time. Prints ``ready``, waits for a line on stdin (so all
workers start together), then prints a JSON line: the HTTP statuses it got and the calls that raised."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter

import aiohttp

from resilient_dspy import Pipeline
from resilient_dspy.middleware.ratelimit import RateLimiter
from resilient_dspy.store import RedisStore


async def main(options: argparse.Namespace) -> None:
    store = RedisStore(options.redis, prefix=options.prefix, timeout=2.0)
    statuses: Counter[int] = Counter()
    raised: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:

        async def program(question: str) -> int:
            body = {"model": "chaos", "messages": [{"role": "user", "content": question}]}
            async with session.post(f"{options.target}/v1/chat/completions", json=body) as response:
                await response.read()
                return response.status

        limiter = RateLimiter(
            requests=options.requests,
            per=options.per,
            counts_from=options.counts_from,
            store=store,
            name="shared-quota",
        )
        pipeline = Pipeline(program, limiter)
        pending = iter(range(options.calls))

        async def caller() -> None:
            for index in pending:
                try:
                    statuses[await pipeline(question=f"{options.worker}-{index}")] += 1
                except Exception as error:  # reported, not hidden: the test asserts there is none
                    raised[type(error).__name__] += 1

        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.gather(*(caller() for _ in range(options.concurrency)))
    await store.aclose()
    print(json.dumps({"statuses": dict(statuses), "raised": dict(raised)}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--target", required=True)
    parser.add_argument("--requests", type=int, required=True)
    parser.add_argument("--per", type=float, required=True)
    parser.add_argument("--calls", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=20)
    parser.add_argument("--worker", default="w")
    parser.add_argument("--counts-from", choices=["answer", "admission"], default="answer")
    asyncio.run(main(parser.parse_args()))
