"""Stop requests between processes: `RedisBroker.request_stop` from one broker reaches the
lease holder in another, at once through pub/sub, or at its next renewal."""

from __future__ import annotations

import asyncio
import uuid

import anyio
import pytest

from redis_server import shared_redis_url
from ssehub.broker.redis import RedisBroker

pytestmark = [pytest.mark.anyio, pytest.mark.redis]


async def test_a_stop_request_from_another_process_is_prompt() -> None:
    prefix = f"stop-{uuid.uuid4().hex}:"
    holder = RedisBroker(shared_redis_url(), prefix=prefix)
    other = RedisBroker(shared_redis_url(), prefix=prefix)
    stopped = anyio.Event()
    try:
        # A long lease: no renewal comes during the test, so only the message can tell.
        async with holder.lease("run:x", ttl=60.0, on_stop=stopped.set):
            await holder.append("run:x", [("message", "a")])
            with anyio.fail_after(2):
                # The holder's subscription may still be starting: ask until it hears.
                while not stopped.is_set():
                    assert await other.request_stop("run:x")
                    with anyio.move_on_after(0.2):
                        await stopped.wait()
            await holder.close("run:x")
        assert not await other.request_stop("run:x")
    finally:
        await holder.aclose()
        await other.aclose()


async def test_a_stop_request_whose_message_was_missed_is_found_by_the_renewal() -> None:
    prefix = f"stop-{uuid.uuid4().hex}:"
    holder = RedisBroker(shared_redis_url(), prefix=prefix)
    other = RedisBroker(shared_redis_url(), prefix=prefix)
    stopped = anyio.Event()
    try:
        async with holder.lease("run:y", ttl=0.6, on_stop=stopped.set):
            # The subscription is down (as after a broken connection): no message comes.
            assert holder._stop_listener is not None
            holder._stop_listener.cancel()
            with pytest.raises(asyncio.CancelledError):
                await holder._stop_listener
            assert await other.request_stop("run:y")
            with anyio.fail_after(5):
                await stopped.wait()
            await holder.close("run:y")
    finally:
        await holder.aclose()
        await other.aclose()
