"""Completion runs: generation as a task of its own, writing a log that clients read.

A streamed completion is the broker log `run:<completion id>`. Each event's data is one
chunk's JSON; the last is `[DONE]` (after an `{"error": ...}` event when the run failed
or was stopped, as vLLM does). The task that generates is not the HTTP request that
asked for it: a client that drops only stops reading, and any client can read the log
again, from the start or from a `Last-Event-ID`, while it runs and for
`completion_retention` seconds after.

With no reader left, a run keeps going for `detach_grace` seconds (long enough for a page
reload) and is then cancelled, which closes the upstream connection: the cost stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from ssehub.broker import Batch, Broker, BrokerError, Retention
from ssehub.gateway.chunks import Tally
from ssehub.gateway.metrics import GatewayMetrics
from ssehub.gateway.schema import error_body
from ssehub.gateway.upstream import StreamFailure
from ssehub.protocol import ServerSentEvent, encode, encode_comment

log = logging.getLogger("ssehub.gateway")

RUN_PREFIX = "run:"
DONE = "[DONE]"
# A run's log keeps every chunk until it expires as a whole (`close(expire_after=...)`):
# a client resuming from the start must get the whole reply. The length bound is a
# safety net against a runaway upstream, far above any real completion.
RUN_RETENTION = Retention(max_len=1_000_000, max_age=None)
# Bytes of a reader's backlog written at once (see `Runs.read`).
WRITE_SIZE = 262_144

# Why a run was stopped, as written in its error event and counted in metrics.
_STOP_MESSAGES = {
    "request": "The completion was cancelled.",
    "detached": "The completion was stopped: no client read it for the detach grace time.",
    "shutdown": "The completion was stopped: the server is shutting down.",
}


# What `Runs.cancel` achieved.
CancelResult = Literal["cancelled", "requested", "none"]


def run_stream(completion_id: str) -> str:
    """The broker log of a completion."""
    return RUN_PREFIX + completion_id


@dataclass(eq=False, slots=True)
class Run:
    """One completion being generated in this process.

    - `readers`: connections reading its log now (here; readers on other nodes are not
      counted).
    - `stop_reason`: why it was cancelled (`request`, `detached`, `shutdown`), else None.
    - `outcome`: how it ended (`finished`, `failed`, `cancelled`, `detached`, `shutdown`),
      None while it runs.
    """

    id: str
    backend: str
    tally: Tally = field(default_factory=Tally)
    started: float = field(default_factory=time.monotonic)
    first_chunk: float | None = None
    readers: int = 0
    detached: bool = False
    stop_reason: str | None = None
    outcome: str | None = None
    task: asyncio.Task[None] | None = None
    grace: asyncio.TimerHandle | None = None
    ended: asyncio.Event = field(default_factory=asyncio.Event)


class Runs:
    """The runs of this process and the readers of their logs."""

    def __init__(
        self,
        broker: Broker,
        metrics: GatewayMetrics,
        *,
        detach_grace: float,
        retention: float,
        heartbeat: float,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        self._detach_grace = detach_grace
        self._retention = retention
        self._heartbeat = heartbeat
        self._runs: dict[str, Run] = {}
        self._checks: set[asyncio.Task[None]] = set()
        self._shutdown: tuple[asyncio.Event, asyncio.Future[Any]] | None = None
        self._endings: set[asyncio.Task[None]] = set()

    def get(self, completion_id: str) -> Run | None:
        return self._runs.get(completion_id)

    def start(
        self,
        completion_id: str,
        backend: str,
        source: AsyncIterator[list[str]],
        tally: Tally | None = None,
    ) -> Run:
        """Start generating `source` (batches of chunk JSON) into the run's log.

        `tally` is the one `source` counts its tokens in. The grace timer starts at once,
        so a run whose client is gone before it reads anything stops too.
        """
        run = Run(completion_id, backend, tally or Tally())
        self._runs[completion_id] = run
        self._metrics.active.inc()
        self._set_detached(run, True)
        run.task = asyncio.get_running_loop().create_task(
            self._leased(run, source), name=f"ssehub run {completion_id}"
        )
        run.task.add_done_callback(lambda _: self._never_started(run, source))
        return run

    def _never_started(self, run: Run, source: AsyncIterator[list[str]]) -> None:
        # A task cancelled before its first step never runs its body, so nothing ended
        # the log: do it now.
        if not run.ended.is_set() and run.outcome is None:
            run.outcome = run.stop_reason or "shutdown"
            if run.outcome == "request":
                run.outcome = "cancelled"
            # Kept referenced until done: the loop holds tasks only weakly.
            ending = asyncio.get_running_loop().create_task(
                self._end(
                    run,
                    source,
                    [
                        _error(
                            _STOP_MESSAGES[run.stop_reason or "shutdown"],
                            "cancelled",
                            run.stop_reason,
                        ),
                        DONE,
                    ],
                )
            )
            self._endings.add(ending)
            ending.add_done_callback(self._endings.discard)

    async def _leased(self, run: Run, source: AsyncIterator[list[str]]) -> None:
        # The lease is held while generating: should this process die mid-run, readers on
        # other nodes end the log with this error and `[DONE]` instead of waiting forever.
        lost = [
            (
                "message",
                _error(
                    "The completion was stopped: the server generating it stopped.",
                    "server_error",
                    "producer_lost",
                ),
            ),
            ("message", DONE),
        ]
        # A stop request from another node (`request_stop`) cancels it as a local one does.
        async with self._broker.lease(
            run_stream(run.id), lost=lost, on_stop=lambda: self._stop(run, "request")
        ):
            await self._generate(run, source)

    async def _generate(self, run: Run, source: AsyncIterator[list[str]]) -> None:
        stream = run_stream(run.id)
        final: list[str] = [DONE]
        try:
            async for batch in source:
                if run.first_chunk is None:
                    run.first_chunk = time.monotonic()
                    self._metrics.time_to_first_token.labels(run.backend).observe(
                        run.first_chunk - run.started
                    )
                if batch:
                    await self._broker.append(
                        stream, [("message", data) for data in batch], RUN_RETENTION
                    )
                if run.stop_reason is not None:
                    # Stopped, but the cancel did not arrive: on Python 3.11,
                    # `asyncio.wait_for` (redis-py sends commands with it) drops a cancel
                    # that lands as its inner step finishes (CPython gh-86296). A stop
                    # must not depend on where this task happened to wait.
                    raise asyncio.CancelledError
            run.outcome = "finished"
        except asyncio.CancelledError:
            # Ours to swallow: this task is the run, and what follows must still happen.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            reason = run.stop_reason or "shutdown"
            run.outcome = "cancelled" if reason == "request" else reason
            final = [_error(_STOP_MESSAGES[reason], "cancelled", code=reason), DONE]
        except StreamFailure as failure:
            run.outcome = "failed"
            final = [orjson.dumps(failure.body).decode(), DONE]
        except BrokerError:
            log.exception("completion %s: the broker failed", run.id)
            run.outcome = "failed"
            final = [_error("The server could not store the stream.", "server_error"), DONE]
        except Exception:
            log.exception("completion %s failed", run.id)
            run.outcome = "failed"
            final = [_error("The model failed while generating.", "server_error"), DONE]
        await self._end(run, source, final)

    async def _end(self, run: Run, source: AsyncIterator[list[str]], final: list[str]) -> None:
        stream = run_stream(run.id)
        # Close the source first (for a relay: the upstream connection), then end the log.
        await _aclose(source)
        try:
            # The run's retention, not the broker's default: that would trim a long log
            # under a reader still behind.
            await self._broker.append(stream, [("message", data) for data in final], RUN_RETENTION)
        except BrokerError:
            log.warning("completion %s: could not write its end", run.id, exc_info=True)
        try:
            await self._broker.close(stream, expire_after=self._retention)
        except BrokerError:
            log.warning("completion %s: could not close its log", run.id, exc_info=True)
        self._finish(run)

    def _finish(self, run: Run) -> None:
        if run.grace is not None:
            run.grace.cancel()
            run.grace = None
        self._set_detached(run, False)
        self._metrics.active.dec()
        self._metrics.completions.labels(run.backend, run.outcome or "failed").inc()
        tokens = run.tally.completion_tokens
        self._metrics.tokens.labels(run.backend).inc(run.tally.tokens)
        if run.outcome == "finished" and run.first_chunk is not None and tokens > 1:
            elapsed = time.monotonic() - run.first_chunk
            if elapsed > 0:
                self._metrics.tokens_per_second.labels(run.backend).observe(tokens / elapsed)
        self._runs.pop(run.id, None)
        run.ended.set()

    def _set_detached(self, run: Run, detached: bool) -> None:
        if detached == run.detached:
            return
        run.detached = detached
        if detached:
            self._metrics.detached.inc()
            run.grace = asyncio.get_running_loop().call_later(
                self._detach_grace, self._grace_over, run
            )
        else:
            self._metrics.detached.dec()
            if run.grace is not None:
                run.grace.cancel()
                run.grace = None

    def _grace_over(self, run: Run) -> None:
        run.grace = None
        if run.readers == 0 and run.outcome is None:
            check = asyncio.get_running_loop().create_task(self._stop_unless_read_elsewhere(run))
            # Held until done: the loop keeps only weak references to tasks.
            self._checks.add(check)
            check.add_done_callback(self._checks.discard)

    async def _stop_unless_read_elsewhere(self, run: Run) -> None:
        # With a shared broker (Redis) the client may have resumed on another node: the
        # run goes on while a reader anywhere follows it, and is asked again later.
        try:
            elsewhere = await self._broker.tailed_elsewhere(run_stream(run.id))
        except BrokerError:
            elsewhere = False
        if run.readers or run.outcome is not None or run.grace is not None:
            return  # a reader came back here meanwhile, or the run ended
        if elsewhere:
            run.grace = asyncio.get_running_loop().call_later(
                self._detach_grace, self._grace_over, run
            )
        else:
            self._stop(run, "detached")

    def _stop(self, run: Run, reason: str) -> bool:
        if run.outcome is not None or run.task is None or run.stop_reason is not None:
            return False
        run.stop_reason = reason
        self._metrics.cancellations.labels(reason).inc()
        run.task.cancel()
        return True

    def attach(self, run: Run) -> None:
        run.readers += 1
        if run.outcome is None:
            self._set_detached(run, False)

    def detach(self, run: Run) -> None:
        run.readers -= 1
        if run.readers == 0 and run.outcome is None:
            self._set_detached(run, True)

    async def cancel(self, completion_id: str, wait: float = 10.0) -> CancelResult:
        """Stop a run, here or in another process sharing the broker.

        - `cancelled`: it was stopped and its log has ended (with a `request` error event
          unless it had already ended another way meanwhile).
        - `requested`: another process generates it and was asked to stop, but its log
          did not end within `wait` seconds (a busy or paused process); the stop is
          recorded in its lease, so it stops when it next hears from the broker.
        - `none`: no process is generating it (unknown, already ended, or its producer
          is gone and its lease lapsed).
        """
        run = self._runs.get(completion_id)
        if run is not None:
            # Already ending (finished, or stopping for another reason): once it has,
            # the caller finds its log closed.
            self._stop(run, "request")
            await run.ended.wait()
            return "cancelled" if run.outcome == "cancelled" else "none"
        # Another node's: its producer hears the request through the broker, stops as for
        # a local cancel (the upstream request is closed there) and ends the log, which
        # every reader on every node then gets.
        stream = run_stream(completion_id)
        try:
            if not await self._broker.request_stop(stream):
                return "none"
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    return "cancelled" if await self._closed(stream) else "none"
        except BrokerError:
            log.warning("completion %s: could not ask for its stop", completion_id, exc_info=True)
            return "none"
        return "requested"

    async def _closed(self, stream: str) -> bool:
        """Wait until `stream` is closed (True), or gone (False)."""
        info = await self._broker.info(stream)
        if info is None:
            return False
        if info.closed:
            return True
        tail = self._broker.tail(stream, info.last_id)
        try:
            async for batch in tail:
                if batch.closed:
                    return True
        finally:
            await _aclose(tail)
        return False

    async def read(
        self, completion_id: str, after: str | None, shutdown: asyncio.Event | None = None
    ) -> AsyncIterator[bytes]:
        """A reader of the run's log from the cursor `after`: wire bytes to send.

        Each step is everything the log got since the previous one, in one piece. While
        nothing comes (a model that has not produced its first token yet), a comment
        every `heartbeat` seconds keeps idle-timeout proxies from cutting the stream.
        The reader ends when `shutdown` is set (the client resumes elsewhere); the run
        itself is stopped by `aclose`.
        """
        run = self._runs.get(completion_id)
        if run is not None:
            self.attach(run)
        stream = run_stream(completion_id)
        tail = self._broker.tail(stream, after)
        pending: asyncio.Future[Batch] | None = None
        cursor = after
        stopping = self._stopping(shutdown)
        try:
            if run is None:
                # The log may have expired after the caller saw it and before the tail
                # began; a tail then waits for the stream to be made again, which a
                # completion's never is. Asked once the tail has begun, `info` settles it.
                pending = asyncio.ensure_future(anext(tail))
                await asyncio.sleep(0)
                if await self._broker.info(stream) is None:
                    message = f"The completion '{completion_id}' has expired."
                    for data in (_error(message, "invalid_request_error", "expired"), DONE):
                        yield encode(ServerSentEvent(data))
                    return
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(tail))
                if stopping is not None or self._heartbeat > 0:
                    waits: set[asyncio.Future[Any]] = {pending}
                    if stopping is not None:
                        waits.add(stopping)
                    done, _ = await asyncio.wait(
                        waits,
                        timeout=self._heartbeat if self._heartbeat > 0 else None,
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if stopping is not None and stopping in done:
                        return
                    if not done:
                        yield encode_comment()
                        continue
                try:
                    batch = await pending
                except StopAsyncIteration:
                    # A tail should end with a `closed` batch; if it ends early (the log
                    # expired, a broker's race), what is left is read directly.
                    pending = None
                    async for rest in self._drain(completion_id, cursor):
                        yield rest
                    return
                pending = None
                if batch.entries:
                    cursor = batch.entries[-1].id
                parts: list[bytes] = []
                if batch.gap:
                    first = batch.entries[0].id if batch.entries else None
                    gap = {"last_event_id": after, "oldest_id": first}
                    parts.append(encode(ServerSentEvent(orjson.dumps(gap).decode(), "ssehub.gap")))
                size = sum(map(len, parts))
                for entry in batch.entries:
                    parts.append(entry.wire)
                    size += len(entry.wire)
                    if size >= WRITE_SIZE:
                        # A backlog goes out in pieces: each write waits for the client
                        # to take the one before (flow control, the send timeout), so a
                        # client that stopped reading does not get the whole log buffered.
                        yield b"".join(parts)
                        parts, size = [], 0
                if parts:
                    yield b"".join(parts)
                if batch.closed:
                    return
        finally:
            # Synchronous work first: a cancelled reader may not get to run what follows
            # an await here.
            if run is not None:
                self.detach(run)
            if pending is not None:
                pending.cancel()
            await _aclose(tail)

    def _stopping(self, shutdown: asyncio.Event | None) -> asyncio.Future[Any] | None:
        """One future for all readers that completes when `shutdown` is set."""
        if shutdown is None:
            return None
        if self._shutdown is None or self._shutdown[0] is not shutdown:
            self._shutdown = (shutdown, asyncio.ensure_future(shutdown.wait()))
        return self._shutdown[1]

    async def _drain(self, completion_id: str, cursor: str | None) -> AsyncIterator[bytes]:
        while True:
            batch = await self._broker.read(run_stream(completion_id), cursor)
            if not batch.entries or batch.gap:
                return
            cursor = batch.entries[-1].id
            yield b"".join(entry.wire for entry in batch.entries)
            if batch.closed:
                return

    async def aclose(self) -> None:
        """Stop every run (their logs get an error event and `[DONE]`) and wait for them."""
        if self._shutdown is not None:
            self._shutdown[1].cancel()
        runs = list(self._runs.values())
        for run in runs:
            self._stop(run, "shutdown")
        for run in runs:
            await run.ended.wait()


def _error(message: str, type: str, code: str | None = None) -> str:
    return orjson.dumps(error_body(message, type, None, code)).decode()


async def _aclose(iterator: AsyncIterator[object]) -> None:
    close = getattr(iterator, "aclose", None)
    if close is not None:
        with contextlib.suppress(Exception):
            await close()
