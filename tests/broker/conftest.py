"""The `broker` fixture the contract suite runs against, once per implementation.

To run the suite against another broker, add its name to `BROKERS` and a branch to
`make_broker` (an async context manager yielding a fresh, empty broker).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator, Callable

import pytest

from ssehub.broker import Broker, Retention
from ssehub.broker.memory import MemoryBroker

BrokerFactory = Callable[..., contextlib.AbstractAsyncContextManager[Broker]]


@contextlib.asynccontextmanager
async def memory_broker(
    retention: Retention | None = None, closed_ttl: float = 3600.0
) -> AsyncIterator[Broker]:
    broker = MemoryBroker(retention=retention, closed_ttl=closed_ttl)
    try:
        yield broker
    finally:
        await broker.aclose()


@contextlib.asynccontextmanager
async def redis_broker(
    retention: Retention | None = None, closed_ttl: float = 3600.0
) -> AsyncIterator[Broker]:
    # A session-wide private redis-server; a fresh key prefix makes each broker empty.
    from redis_server import shared_redis_url
    from ssehub.broker.redis import RedisBroker

    broker = RedisBroker(
        shared_redis_url(),
        retention=retention,
        closed_ttl=closed_ttl,
        prefix=f"test-{uuid.uuid4().hex}:",
    )
    try:
        yield broker
    finally:
        await broker.aclose()


BROKERS: dict[str, BrokerFactory] = {"memory": memory_broker, "redis": redis_broker}


@pytest.fixture(params=sorted(BROKERS))
def make_broker(request: pytest.FixtureRequest) -> BrokerFactory:
    """`make_broker(retention=..., closed_ttl=...)`: a fresh broker as an async context."""
    factory: BrokerFactory = BROKERS[request.param]
    return factory


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> AsyncIterator[Broker]:
    async with make_broker() as b:
        yield b
