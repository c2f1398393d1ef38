"""A process that takes a held admission of a RateLimiter shared on Redis and hangs in its call: the test kills it
there, as a crash would, and checks that the held entry's lease ends it. Prints ``admitted`` once the call runs."""

from __future__ import annotations

import argparse
import asyncio

from resilient_dspy import Pipeline, Timeout
from resilient_dspy.middleware.ratelimit import RateLimiter
from resilient_dspy.store import RedisStore


async def main(options: argparse.Namespace) -> None:
    store = RedisStore(options.redis, prefix=options.prefix, timeout=2.0)

    async def program(question: str) -> str:
        print("admitted", flush=True)
        await asyncio.sleep(3600)
        return question

    limiter = RateLimiter(requests=1, per=options.per, store=store, name="q")
    await Pipeline(program, Timeout(options.deadline), limiter)(question="held")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--redis", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--per", type=float, required=True)
    parser.add_argument("--deadline", type=float, required=True)
    asyncio.run(main(parser.parse_args()))
