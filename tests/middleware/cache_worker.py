"""One worker process of the multi-process cache test: ``python -m tests.middleware.cache_worker URL PREFIX API_BASE
N`` builds a pipeline with a Cache on a RedisBackend, prints ``ready``, waits for a line on stdin (so every worker
starts at once, however long its imports took), asks N questions at once over real HTTP (the chaos server) and
prints its cache counts as JSON."""

from __future__ import annotations

import asyncio
import json
import os
import sys

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import logging

import dspy

from resilient_dspy import Cache, Pipeline, Timeout
from resilient_dspy.middleware.cache.backends import RedisBackend
from resilient_dspy.store import RedisStore


async def main(url: str, prefix: str, api_base: str, questions: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    store = RedisStore(url, prefix=prefix, timeout=1.0)  # a shared 2-core machine: a cold step may take a while
    backend = RedisBackend(store)
    cache = Cache(backend)
    pipeline = Pipeline(dspy.Predict("question -> answer"), Timeout(20.0), cache)
    lm = dspy.LM("openai/chaos", api_base=api_base, api_key="chaos", cache=False, num_retries=0)
    # warm up as a server would at startup: the connections the burst will use, the scripts loaded
    await asyncio.gather(*(backend.get(f"warm:{index}") for index in range(questions)))
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    with dspy.context(lm=lm):
        answers = await asyncio.gather(*(pipeline(f"question {index}?") for index in range(questions)))
    await cache.drain()
    await store.aclose()
    stats = cache.snapshot()
    print(
        json.dumps(
            {
                "answers": len(answers),
                "misses": stats.misses,
                "coalesced": stats.coalesced,
                "hits": stats.hits,
                "errors": stats.errors,
                "timeouts": stats.timeouts,
            }
        )
    )


if __name__ == "__main__":
    url, prefix, api_base, questions = sys.argv[1:5]
    asyncio.run(main(url, prefix, api_base, int(questions)))
