"""RedisStore against a real redis-server: atomic steps, namespaced keys, bounded steps, outages and recovery."""

from __future__ import annotations

import asyncio

import pytest

from resilient_dspy.errors import ConfigurationError
from resilient_dspy.store import RedisStore, StateStore, StoreUnavailableError
from tests.redis_server import free_port, redis_server

pytestmark = [pytest.mark.redis, pytest.mark.looptime(False)]  # real sockets: virtual time would fire timeouts at once

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
NOW = "local t = redis.call('TIME'); return {t[1], t[2]}"


async def test_a_step_runs_atomically_on_the_server_under_the_stores_prefix(redis_store: RedisStore) -> None:
    key = redis_store.key("counter", "tenant-a")
    assert key.startswith(redis_store.options.prefix + ":")
    results = await asyncio.gather(*(redis_store.run(INCR, [key], [1], operation="count") for _ in range(50)))
    assert sorted(results) == list(range(1, 51))
    assert isinstance(redis_store, StateStore)
    assert redis_store.health().status == "ok"


async def test_scripts_read_the_servers_clock(redis_store: RedisStore) -> None:
    seconds, micros = await redis_store.run(NOW, [], [], operation="time")
    assert int(seconds) > 1_600_000_000 and 0 <= int(micros) < 1_000_000


async def test_a_step_slower_than_the_timeout_fails_typed_and_fast(redis_url: str) -> None:
    store = RedisStore(redis_url, prefix="slow", timeout=0.05)
    slow = (
        "local t0 = redis.call('TIME'); repeat local t = redis.call('TIME')"
        " until (t[1]-t0[1])*1e6 + (t[2]-t0[2]) > 200000; return 1"
    )
    try:
        with pytest.raises(StoreUnavailableError) as raised:
            await store.run(slow, [], [], operation="spin")
        assert raised.value.operation == "spin"
        assert store.health().status == "degraded"
    finally:
        await asyncio.sleep(0.3)  # let the server finish the script before the connection is closed
        await store.aclose()


async def test_a_dead_server_fails_each_step_at_once_then_is_used_again_after_a_restart() -> None:
    port = free_port()
    with redis_server(port) as url:
        store = RedisStore(url, prefix="restart", timeout=0.5, retry_interval=0.2)
        key = store.key("n")
        assert await store.run(INCR, [key], [1], operation="count") == 1
    # the server is gone
    with pytest.raises(StoreUnavailableError):
        await store.run(INCR, [key], [1], operation="count")
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(StoreUnavailableError):  # within retry_interval: no network at all
        await store.run(INCR, [key], [1], operation="count")
    assert loop.time() - started < 0.05
    assert store.health().status == "degraded"
    with redis_server(port):
        await asyncio.sleep(0.25)
        assert await store.run(INCR, [key], [1], operation="count") == 1  # a new, empty server; scripts reloaded
        assert store.health().status == "ok"
    await store.aclose()


async def test_warm_opens_the_connections_a_busy_start_needs(redis_store: RedisStore) -> None:
    name = f"warm-{redis_store.options.prefix}"
    redis_store.client.connection_pool.connection_kwargs["client_name"] = name
    await redis_store.warm(4)
    clients = await redis_store.client.client_list()
    assert sum(1 for client in clients if client.get("name") == name) >= 4  # the server sees four connections


async def test_warming_a_store_with_no_server_fails_typed() -> None:
    store = RedisStore(f"redis://127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailableError):
        async with asyncio.timeout(5.0):
            await store.warm(2)
    await store.aclose()


def test_a_password_in_the_url_never_reaches_its_name_or_describe() -> None:
    store = RedisStore("redis://user:s3cret@127.0.0.1:6399/2")
    assert "s3cret" not in store.name and "s3cret" not in str(store.describe()) and "s3cret" not in repr(store)
    assert store.name == "redis://user:***@127.0.0.1:6399/2"


@pytest.mark.parametrize("given", [{}, {"url": "redis://127.0.0.1:1/0", "client": object()}])
def test_exactly_one_of_url_and_client_is_required(given: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match=r"RedisStore\.url"):
        RedisStore(**given)  # type: ignore[arg-type]


def test_bad_options_are_named() -> None:
    with pytest.raises(ConfigurationError, match=r"RedisStore\.timeout"):
        RedisStore("redis://127.0.0.1:1/0", timeout=0)
