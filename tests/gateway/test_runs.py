"""The run lifecycle against the broker contract, without HTTP."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import pytest
from prometheus_client import CollectorRegistry

from ssehub.broker.memory import MemoryBroker
from ssehub.gateway.metrics import GatewayMetrics
from ssehub.gateway.runs import Runs, run_stream


def make_runs(broker: MemoryBroker, grace: float = 5.0) -> tuple[Runs, CollectorRegistry]:
    registry = CollectorRegistry()
    runs = Runs(broker, GatewayMetrics(registry), detach_grace=grace, retention=60, heartbeat=0)
    return runs, registry


async def endless() -> AsyncIterator[list[str]]:
    i = 0
    while True:
        yield [json.dumps({"n": i})]
        i += 1
        await asyncio.sleep(0.01)


async def log_of(broker: MemoryBroker, completion_id: str) -> list[str]:
    batch = await broker.read(run_stream(completion_id), None, limit=100_000)
    assert batch.closed
    return [entry.data for entry in batch.entries]


@pytest.mark.anyio
async def test_cancel_before_the_first_step() -> None:
    broker = MemoryBroker()
    runs, registry = make_runs(broker)
    run = runs.start("c1", "demo", endless())
    assert await runs.cancel("c1") == "cancelled"
    data = await log_of(broker, "c1")
    assert data[-1] == "[DONE]"
    assert json.loads(data[-2])["error"]["code"] == "request"
    assert run.outcome == "cancelled"
    assert runs.get("c1") is None
    assert await runs.cancel("c1") == "none"
    value = registry.get_sample_value(
        "ssehub_gateway_completions_total", {"backend": "demo", "outcome": "cancelled"}
    )
    assert value == 1


@pytest.mark.anyio
async def test_shutdown_ends_every_run() -> None:
    broker = MemoryBroker()
    runs, registry = make_runs(broker)
    for name in ("a", "b"):
        runs.start(name, "upstream", endless())
    await asyncio.sleep(0.05)
    await runs.aclose()
    for name in ("a", "b"):
        data = await log_of(broker, name)
        assert json.loads(data[0]) == {"n": 0}
        assert json.loads(data[-2])["error"]["code"] == "shutdown"
    assert registry.get_sample_value("ssehub_gateway_active_streams") == 0
    assert registry.get_sample_value("ssehub_gateway_detached_streams") == 0


@pytest.mark.anyio
async def test_a_failing_model_ends_its_log() -> None:
    async def broken() -> AsyncIterator[list[str]]:
        yield ['{"n": 0}']
        raise RuntimeError("boom")

    broker = MemoryBroker()
    runs, _ = make_runs(broker)
    run = runs.start("c2", "demo", broken())
    await run.ended.wait()
    data = await log_of(broker, "c2")
    assert data[0] == '{"n": 0}'
    assert json.loads(data[1])["error"]["type"] == "server_error"
    assert data[2] == "[DONE]"


@pytest.mark.anyio
async def test_reader_keeps_a_run_alive_and_its_end_detaches() -> None:
    broker = MemoryBroker()
    runs, registry = make_runs(broker, grace=0.05)
    run = runs.start("c3", "demo", endless())
    reader = runs.read("c3", None)
    await anext(reader)
    await asyncio.sleep(0.2)  # four grace times with a reader: still running
    assert run.outcome is None
    assert registry.get_sample_value("ssehub_gateway_detached_streams") == 0
    await reader.aclose()
    await asyncio.wait_for(run.ended.wait(), 5)
    assert run.outcome == "detached"


@pytest.mark.anyio
@pytest.mark.parametrize("cursor", [None, "1-0"])
async def test_a_reader_of_a_log_that_expired_ends_with_an_error(cursor: str | None) -> None:
    """The log expired between the resume route's check and the reader's tail."""
    broker = MemoryBroker()
    runs, _ = make_runs(broker)
    stream = run_stream("gone")
    await broker.append(stream, [("message", "{}"), ("message", "[DONE]")])
    await broker.close(stream, expire_after=0)
    with anyio.fail_after(5):
        while True:  # until the expiry timer (0 s) has run
            if await broker.info(stream) is None:
                break
            await asyncio.sleep(0)
        wire = b"".join([part async for part in runs.read("gone", cursor)])
    data = [line[6:] for line in wire.decode().splitlines() if line.startswith("data: ")]
    assert json.loads(data[0])["error"]["code"] == "expired"
    assert data[-1] == "[DONE]"


class SwallowingBroker(MemoryBroker):
    """A broker whose append drops a cancel that lands in it, as Python 3.11's
    `asyncio.wait_for` does when its inner step finishes at that moment (redis-py)."""

    async def append(self, *args: Any, **kwargs: Any) -> Any:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(0.05)
        return await super().append(*args, **kwargs)


@pytest.mark.anyio
async def test_a_cancel_lost_on_its_way_still_stops_the_run() -> None:
    async def eager() -> AsyncIterator[list[str]]:
        i = 0
        while True:
            yield [json.dumps({"n": i})]
            i += 1
            await asyncio.sleep(0)

    broker = SwallowingBroker()
    runs, _ = make_runs(broker)
    run = runs.start("c3", "demo", eager())
    await asyncio.sleep(0.02)  # inside an append, where the cancel will land
    async with asyncio.timeout(10):
        assert await runs.cancel("c3") == "cancelled"
    data = await log_of(broker, "c3")
    assert json.loads(data[-2])["error"]["code"] == "request"
    assert run.outcome == "cancelled"
