"""Clients that stop reading, server shutdown, and the jobs demo, over real HTTP."""

from __future__ import annotations

import json
import signal
import socket
import time

import httpx
import pytest

from server._sse import Stream, running, stalled_subscriber

from _support import serve_in_process, wait_for


def drain_until_closed(sock: socket.socket, limit: float = 15.0) -> int:
    """Read a socket until the server closes it; returns the bytes read."""
    sock.settimeout(limit)
    total = 0
    try:
        while chunk := sock.recv(1 << 20):
            total += len(chunk)
    except ConnectionResetError:
        pass
    return total


@pytest.mark.parametrize("http", ["hub", "httptools", "h11"])
def test_a_stalled_client_is_dropped_and_blocks_nobody(http: str) -> None:
    with running(max_pending=64 * 1024, send_timeout=60, http=http) as server:
        sock = stalled_subscriber(server.url, "/channels/s")
        try:
            with Stream(server.client, "/channels/s") as good:
                server.wait_live(2)
                payload = "x" * 8000
                sent = 0
                while server.hub.stats().slow_consumer_disconnects == 0:
                    assert sent < 4000, "the stalled subscriber was never dropped"
                    r = server.client.post("/channels/s", json=[payload] * 20)
                    assert r.status_code == 200
                    sent += 20
                    # The reading subscriber keeps up all along.
                    good.read_until(lambda s, n=sent: len(s.events) >= n)
                wait_for(lambda: len(server.hub.connections()) == 1)
                (conn,) = server.hub.connections()
                assert conn.user_agent != "stalled"
                server.publish("s", "after")
                good.read_until(lambda s: s.events[-1].data == "after")
                assert all(e.data == payload for e in good.events[:-1])
            # The dropped one was cut off: it can read what was buffered, then EOF.
            assert drain_until_closed(sock) < sent * len(payload)
        finally:
            sock.close()
        stats = server.client.get("/admin/stats").json()
        assert stats["slow_consumer_disconnects"] == 1


@pytest.mark.parametrize("http", ["hub", "httptools", "h11"])
def test_a_write_waiting_too_long_times_out(http: str) -> None:
    with running(max_pending=1 << 30, send_timeout=0.5, http=http) as server:
        sock = stalled_subscriber(server.url, "/channels/t")
        try:
            server.wait_live(1)
            payload = "y" * 16000

            def stuck() -> bool:
                server.client.post("/channels/t", json=[payload] * 20)
                return any(c.pending_bytes for c in server.hub.connections())

            wait_for(stuck, 30, 0, "the stalled subscriber's writes to back up")
            wait_for(lambda: server.hub.stats().send_timeouts == 1, 10)
            wait_for(lambda: not server.hub.connections())
            drain_until_closed(sock)
        finally:
            sock.close()


def test_shutdown_ends_open_streams_promptly() -> None:
    grace = 10.0
    with serve_in_process("--shutdown-grace", str(grace), "--heartbeat", "0") as (url, proc):
        client = httpx.Client(base_url=url, timeout=15)
        streams = [Stream(client, f"/channels/sd{i % 2}") for i in range(3)]
        wait_for(lambda: client.get("/admin/stats").json()["connections"] == 3)
        client.post("/channels/sd0", content="before")
        streams[0].events_n(1)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        for stream in streams:
            stream.until_end()
        ended = time.monotonic() - started
        # uvicorn re-raises the signal it caught once it is done: -SIGTERM is a clean exit.
        assert proc.wait(timeout=grace) in (0, -signal.SIGTERM)
        exited = time.monotonic() - started
        for stream in streams:
            stream.close()
        client.close()
    # Well inside the grace period: streams were ended, not waited out.
    assert ended < grace / 2
    assert exited < grace / 2


def test_job_reports_progress_then_closes() -> None:
    with running() as server:
        r = server.client.post("/demo/jobs", json={"delay": 0.01})
        assert r.status_code == 202
        job = r.json()
        assert job["channel"] == f"jobs/{job['id']}"
        with Stream(server.client, job["events"]) as stream:
            stream.until_end()
        progress = [json.loads(e.data) for e in stream.events if e.event == "progress"]
        values = [p["progress"] for p in progress]
        assert values == sorted(values)
        assert values[-1] == 100
        assert stream.events[-1].event == "close"
        assert json.loads(stream.events[-1].data) == {
            "job": job["id"],
            "progress": 100,
            "state": "done",
        }
        # A late subscriber gets the latest state first, then the end.
        with Stream(server.client, job["events"]) as late:
            late.until_end()
        assert [e.event for e in late.events] == ["progress", "close"]
        assert json.loads(late.events[0].data)["progress"] == 100
        # And its browser's reconnect is told to stop.
        close_id = late.events[-1].id
        r = server.client.get(job["events"], headers={"Last-Event-ID": close_id or ""})
        assert r.status_code == 204


def test_a_late_subscriber_to_a_running_job_starts_at_the_latest_state() -> None:
    with running() as server:
        job = server.client.post("/demo/jobs", json={"delay": 0.2}).json()
        with Stream(server.client, job["events"]) as first:
            first.read_until(
                lambda s: any(json.loads(e.data)["progress"] >= 30 for e in s.events),
                what="progress 30",
            )
            with Stream(server.client, job["events"]) as late:
                (state,) = late.events_n(1)
                assert json.loads(state.data)["progress"] >= 30
                late.until_end()
            first.until_end()
        assert late.events[-1].event == "close"
        # The late one saw no progress value twice and none go backwards.
        values = [json.loads(e.data)["progress"] for e in late.events if e.event == "progress"]
        assert values == sorted(set(values))
