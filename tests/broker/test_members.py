"""`Broker.join` / `ask` / `leave`: the one process of a memory broker, and Redis brokers
standing in for processes that share one Redis (each its own process id)."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

import anyio
import pytest

from ssehub.broker.base import Answerer, Member
from ssehub.broker.memory import MemoryBroker

pytestmark = pytest.mark.anyio


def echo(name: str) -> Answerer:
    async def answer(question: Mapping[str, Any]) -> Mapping[str, Any]:
        return {"name": name, "asked": dict(question)}

    return answer


async def test_a_memory_broker_answers_for_its_one_process() -> None:
    broker = MemoryBroker()
    assert broker.process is None
    assert (await broker.ask({"q": 1})).answers == ()
    await broker.join(echo("only"), {"node": "here:1"})
    answers = await broker.ask({"q": 1})
    assert answers.answers == (
        (Member(None, {"node": "here:1"}), {"name": "only", "asked": {"q": 1}}),
    )
    assert answers.unanswered == ()
    # No process has an id to be addressed by.
    assert (await broker.ask({"q": 1}, to="anything")).answers == ()
    await broker.leave()
    assert (await broker.ask({"q": 1})).answers == ()
    await broker.aclose()


@contextlib.asynccontextmanager
async def processes(count: int, lease_check: float = 1.0) -> AsyncIterator[list[Any]]:
    """`count` Redis brokers sharing a fresh key prefix on the session's Redis."""
    from redis_server import shared_redis_url
    from ssehub.broker.redis import RedisBroker

    prefix = f"members-{uuid.uuid4().hex}:"
    brokers = [
        RedisBroker(shared_redis_url(), prefix=prefix, lease_check=lease_check)
        for _ in range(count)
    ]
    try:
        yield brokers
    finally:
        for broker in brokers:
            await broker.aclose()


@pytest.mark.redis
async def test_every_member_answers_and_one_can_be_asked_alone() -> None:
    async with processes(3) as (a, b, asker):
        await a.join(echo("a"), {"node": "a:1"})
        await b.join(echo("b"), {"node": "b:1"})
        # `asker` never joined: it asks, nobody asks it.
        answers = await asker.ask({"q": "all"}, wait=5)
        assert answers.unanswered == []
        got = {m.process: (m.about, body["name"]) for m, body in answers.answers}
        assert got == {a.process: ({"node": "a:1"}, "a"), b.process: ({"node": "b:1"}, "b")}

        only_b = await a.ask({"q": "b?"}, to=b.process, wait=5)
        assert [(m.process, body) for m, body in only_b.answers] == [
            (b.process, {"name": "b", "asked": {"q": "b?"}})
        ]
        assert (await a.ask({"q": 1}, to="0123456789ab", wait=5)).answers == ()

        await b.leave()
        after = await asker.ask({"q": "all"}, wait=5)
        assert [m.process for m, _ in after.answers] == [a.process]
        assert after.unanswered == []


@pytest.mark.redis
async def test_a_member_that_does_not_answer_is_named_and_one_that_died_drops_out() -> None:
    async with processes(2, lease_check=0.1) as (alive, dying):
        await alive.join(echo("alive"), {"node": "alive:1"})
        await dying.join(echo("dying"), {"node": "dying:1"})
        assert len((await alive.ask({}, wait=5)).answers) == 2
        # As if killed: no more renewals, no more answers, nothing said on the way out.
        for task in (dying._membership, dying._stop_listener):
            assert task is not None
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        started = time.monotonic()
        answers = await alive.ask({}, wait=0.3)
        assert [m.process for m, _ in answers.answers] == [alive.process]
        assert answers.unanswered == [Member(dying.process, {"node": "dying:1"})]
        # Its membership lapses three renewals (0.3 s) after the last.
        with anyio.fail_after(5):
            while (await alive.ask({}, wait=0.3)).unanswered:
                pass
        assert time.monotonic() - started < 2


@pytest.mark.redis
async def test_an_answerer_that_fails_leaves_its_member_unanswered() -> None:
    async def broken(question: Mapping[str, Any]) -> Mapping[str, Any]:
        raise RuntimeError("no")

    async with processes(2) as (good, bad):
        await good.join(echo("good"), {})
        await bad.join(broken, {"node": "bad:1"})
        answers = await good.ask({}, wait=0.5)
        assert [m.process for m, _ in answers.answers] == [good.process]
        assert [m.process for m in answers.unanswered] == [bad.process]
