"""`ssehub listen` as a user runs it: a subprocess against the real test server."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import threading
from pathlib import Path

import orjson
import pytest

from ssehub.cli.listen import render
from ssehub.protocol import ServerSentEvent

from .conftest import Server
from _support import free_port, wait_for

LISTEN = [sys.executable, "-m", "ssehub", "listen"]


def listen(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*LISTEN, *args],
        input=None if input is None else input.decode(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def json_lines(stdout: str) -> list[dict[str, object]]:
    return [orjson.loads(line) for line in stdout.splitlines()]


def test_json_lines_when_stdout_is_not_a_terminal(server: Server, key: str) -> None:
    # The stream drops once and sets retry: the listener resumes (no loss, no duplicate)
    # and reports the reconnection time along with each event.
    result = listen(server("/numbers", key, count=3, drop=2, retry=20))
    assert result.returncode == 0, result.stderr
    assert json_lines(result.stdout) == [
        {"event": "message", "data": f"event {n}", "id": str(n), "retry": 20} for n in (1, 2, 3)
    ]
    # The reconnection is reported on stderr, away from the data.
    assert "reconnecting in" in result.stderr
    assert "Traceback" not in result.stderr


def test_json_flag_and_event_types(server: Server, key: str) -> None:
    result = listen(server("/numbers", key, count=2, type="tick", retry=10), "--json")
    assert result.returncode == 0, result.stderr
    assert json_lines(result.stdout) == [
        {"event": "tick", "data": "event 1", "id": "1", "retry": 10},
        {"event": "tick", "data": "event 2", "id": "2", "retry": 10},
    ]


def test_post_with_headers_and_body(server: Server, key: str) -> None:
    result = listen(
        server("/numbers", key, count=2),
        "-X",
        "POST",
        "-H",
        "Authorization: Bearer sk-test",
        "-H",
        "X-Trace:  abc ",
        "-d",
        '{"prompt": "hi"}',
    )
    assert result.returncode == 0, result.stderr
    assert [line["id"] for line in json_lines(result.stdout)] == ["1", "2"]
    (request,) = server.seen.of(key)  # POST does not reconnect after a clean end
    assert request.method == "POST"
    assert request.body == b'{"prompt": "hi"}'
    assert request.headers["content-type"] == "application/json"
    assert request.headers["authorization"] == "Bearer sk-test"
    assert request.headers["x-trace"] == "abc"


def test_data_implies_post_and_reads_files_and_stdin(
    server: Server, key: str, tmp_path: Path
) -> None:
    body = tmp_path / "body.json"
    body.write_bytes(b'{"from": "file"}')
    assert listen(server("/numbers", key, count=1), "-d", f"@{body}").returncode == 0
    result = listen(
        server("/numbers", key, count=1),
        "-d",
        "@-",
        "-H",
        "content-type: text/plain",
        input=b"from stdin",
    )
    assert result.returncode == 0, result.stderr
    first, second = server.seen.of(key)
    assert (first.method, first.body) == ("POST", b'{"from": "file"}')
    assert (second.body, second.headers["content-type"]) == (b"from stdin", "text/plain")


def test_last_event_id(server: Server, key: str) -> None:
    result = listen(server("/numbers", key, count=10, retry=10), "--last-event-id", "7")
    assert result.returncode == 0, result.stderr
    assert [line["id"] for line in json_lines(result.stdout)] == ["8", "9", "10"]
    assert server.seen.of(key)[0].last_event_id == "7"


def test_http_error_is_one_line_and_exit_1(server: Server, key: str) -> None:
    result = listen(server("/status", key, code=500))
    assert result.returncode == 1
    assert result.stdout == ""
    (line,) = result.stderr.strip().splitlines()
    assert "500 Internal Server Error" in line
    assert "boom: the database is on fire" in line


def test_wrong_content_type_is_one_line_and_exit_1(server: Server, key: str) -> None:
    result = listen(server("/wrong-type", key))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert "not text/event-stream" in line


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["http://127.0.0.1:{port}/", "--no-reconnect"], "Connection refused"),
        (["ftp://127.0.0.1:{port}/"], "unsupported protocol"),
        (["http://127.0.0.1:{port}/", "-H", "no colon"], "bad header 'no colon'"),
        (["http://127.0.0.1:{port}/", "-d", "@/nonexistent/body"], "cannot read"),
        (["http://127.0.0.1:{port}/", "--last-event-id", "a\nb"], "must not contain"),
    ],
)
def test_errors_are_one_line_and_exit_1(args: list[str], message: str) -> None:
    port = free_port()
    result = listen(*(a.format(port=port) for a in args))
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert message in line


def test_a_drop_without_reconnect_exits_1_after_the_events(server: Server, key: str) -> None:
    result = listen(server("/numbers", key, count=5, drop=2), "--no-reconnect")
    assert result.returncode == 1
    assert [line["id"] for line in json_lines(result.stdout)] == ["1", "2"]
    (line,) = result.stderr.strip().splitlines()
    assert "incomplete chunked read" in line


def test_idle_timeout_flag(server: Server, key: str) -> None:
    result = listen(server("/stall", key), "--idle-timeout", "1", "--no-reconnect")
    assert result.returncode == 1
    assert json_lines(result.stdout) == [
        {"event": "message", "data": "hello", "id": "1", "retry": None}
    ]
    assert "no data for 1s" in result.stderr


def test_ctrl_c_exits_130_without_traceback(server: Server, key: str) -> None:
    proc = subprocess.Popen(
        [*LISTEN, server("/stall", key)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()  # blocks until the listener printed the event
        assert orjson.loads(first)["data"] == "hello"
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130
    assert "Traceback" not in stderr
    assert "Aborted" not in stderr
    wait_for(lambda: key in server.seen.disconnected, what="the server to see the client go")


def test_a_terminal_gets_coloured_readable_events(server: Server, key: str) -> None:
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [*LISTEN, server("/numbers", key, count=2, json=1, type="tick", retry=10)],
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
        env={**os.environ, "TERM": "xterm-256color", "COLUMNS": "200"},
    )
    os.close(terminal)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # EIO: the terminal's last writer is gone
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        assert proc.wait(timeout=60) == 0
        reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(controller)
    output = b"".join(chunks).decode()
    assert "\x1b[" in output  # colour
    plain = _strip_ansi(output)
    assert 'tick #1  {"n":1}' in plain
    assert 'tick #2  {"n":2}' in plain
    assert "connected: GET" in plain  # notices on a terminal's stderr
    assert '"retry"' not in plain  # not the JSON lines form


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_render_multiline_and_plain_events() -> None:
    multi = render(ServerSentEvent(data="line one\nline two", event="note", id="9"))
    assert multi.plain == "note #9\n  line one\n  line two"
    plain = render(ServerSentEvent(data="[not json", id=""))
    assert plain.plain == "message  [not json"
    error = render(ServerSentEvent(data="bad", event="error", id="3"))
    assert error.plain == "error #3  bad"
    assert any("red" in str(span.style) for span in error.spans)
