"""ssehub.js in Chromium: the parser against spec cases (and the protocol's shared table),
and fetchEventStream's reconnect, backoff and resume against a scripted fetch."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.applications import Starlette

from ssehub.web import routes

from _support import serve_in_thread

pytestmark = pytest.mark.browser

# The protocol's own table (tests/protocol/cases.json): the same cases the Python decoder
# passes, so the browser and Python clients read every stream alike.
SHARED_CASES: list[dict[str, Any]] = json.loads(
    (Path(__file__).parent.parent / "protocol" / "cases.json").read_text()
)["cases"]

# (name, stream, [(type, data, id), ...], retry, last_event_id)
SPEC_CASES: list[tuple[str, str, list[tuple[str, str, str]], int | None, str]] = [
    ("one event", "data: a\n\n", [("message", "a", "")], None, ""),
    ("bom dropped once", "\ufeffdata: a\n\n", [("message", "a", "")], None, ""),
    ("second bom is part of the field name", "\ufeff\ufeffdata: a\n\n", [], None, ""),
    (
        "cr, lf and crlf",
        "data: a\r\rdata: b\n\ndata: c\r\n\r\n",
        [("message", "a", ""), ("message", "b", ""), ("message", "c", "")],
        None,
        "",
    ),
    ("comment", ": hello\ndata: x\n\n", [("message", "x", "")], None, ""),
    ("field without colon", "data\n\n", [("message", "", "")], None, ""),
    ("two empty data lines", "data\ndata\n\n", [("message", "\n", "")], None, ""),
    ("one leading space removed", "data:  two\ndata:x\n\n", [("message", " two\nx", "")], None, ""),
    (
        "event type then reset",
        "event: add\ndata: 1\n\ndata: 2\n\n",
        [("add", "1", ""), ("message", "2", "")],
        None,
        "",
    ),
    ("empty-data block sets the id", "id: 7\n\ndata: x\n\n", [("message", "x", "7")], None, "7"),
    (
        "id kept across events",
        "id: 1\ndata: a\n\ndata: b\n\n",
        [("message", "a", "1"), ("message", "b", "1")],
        None,
        "1",
    ),
    (
        "id with nul ignored",
        "id: 1\n\nid: a\u0000b\ndata: x\n\n",
        [("message", "x", "1")],
        None,
        "1",
    ),
    (
        "bare id resets",
        "id: 1\ndata: a\n\nid\ndata: b\n\n",
        [("message", "a", "1"), ("message", "b", "")],
        None,
        "",
    ),
    ("retry digits", "retry: 1500\n", [], 1500, ""),
    ("retry not digits", "retry: 1500\nretry: 1.5\nretry: 9a\nretry: -1\n", [], 1500, ""),
    ("unknown field ignored", "foo: bar\ndata: x\n\n", [("message", "x", "")], None, ""),
    ("incomplete event discarded", "data: x\n\ndata: y\n", [("message", "x", "")], None, ""),
    ("unterminated line discarded", "data: x", [], None, ""),
    ("pending id not yet the last event id", "id: 5\ndata: y\n", [], None, ""),
    ("unicode", "data: héllo 😀\n\n", [("message", "héllo 😀", "")], None, ""),
    ("colon in value", "data: a: b\n\n", [("message", "a: b", "")], None, ""),
    ("space in field name", "data : x\n\n", [], None, ""),
]

# Runs one case three ways: whole, character by character, and as UTF-8 bytes one byte at a
# time through fetchEventStream (the code path a real response takes).
RUN_CASE = """
async ({ stream, hex }) => {
  const m = await import('/static/ssehub.js');
  const shape = (r) => ({
    events: r.events.map((e) => [e.type, e.data, e.id]),
    retry: r.retry,
    last_event_id: r.lastEventId,
  });
  const bytes = hex === null
    ? new TextEncoder().encode(stream)
    : Uint8Array.from(hex.match(/../g) || [], (pair) => parseInt(pair, 16));
  // What fetchEventStream's decoder makes of the bytes (the parser drops the BOM itself).
  const text = new TextDecoder('utf-8', { ignoreBOM: true }).decode(bytes);
  const whole = shape(m.parseEventStream(text));
  const chars = shape(m.parseEventStream(text, 1));
  const events = [];
  let retry = null;
  const fakeFetch = async () => new Response(new ReadableStream({
    start(controller) {
      for (const b of bytes) controller.enqueue(new Uint8Array([b]));
      controller.close();
    },
  }), { headers: { 'content-type': 'text/event-stream' } });
  const result = await m.fetchEventStream('/x', {
    fetch: fakeFetch,
    onEvent: (e) => events.push([e.type, e.data, e.id]),
    onRetry: (ms) => { retry = ms; },
  });
  const byByte = { events, retry, last_event_id: result.lastEventId };
  return { whole, chars, byByte };
}
"""


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_in_thread(Starlette(routes=routes())) as url:
        yield url


@pytest.fixture(scope="module")
def js(browser: Any, base: str) -> Iterator[Any]:
    """One page for the module (cases are pure functions); it must log no errors."""
    from conftest import ConsoleLog

    console = ConsoleLog()
    context = browser.new_context()
    page = context.new_page()
    console.attach(page)
    page.goto(base + "/monitor")
    yield page
    context.close()
    assert console.errors == [], "\n".join(console.errors)


def _check(js: Any, stream: str | None, expected: dict[str, Any], hex: str | None = None) -> None:
    result = js.evaluate(RUN_CASE, {"stream": stream, "hex": hex})
    for way, got in result.items():
        assert got == expected, f"{way}: {got} != {expected}"


@pytest.mark.parametrize(
    ("stream", "events", "retry", "last_event_id"),
    [case[1:] for case in SPEC_CASES],
    ids=[case[0] for case in SPEC_CASES],
)
def test_parser_spec_cases(
    js: Any, stream: str, events: list[tuple[str, str, str]], retry: int | None, last_event_id: str
) -> None:
    expected = {
        "events": [list(e) for e in events],
        "retry": retry,
        "last_event_id": last_event_id,
    }
    _check(js, stream, expected)


@pytest.mark.parametrize("case", SHARED_CASES, ids=[c["name"] for c in SHARED_CASES])
def test_parser_shared_case_table(js: Any, case: dict[str, Any]) -> None:
    expected = {
        "events": [[e["event"], e["data"], e["id"]] for e in case["events"]],
        "retry": case["retry"],
        "last_event_id": case["last_event_id"],
    }
    if isinstance(case["retry"], int) and case["retry"] > 2**53:
        # A JS number is a double: beyond 2**53 the browser holds the nearest one.
        expected["retry"] = int(float(case["retry"]))
    _check(js, case.get("input"), expected, case.get("input_hex"))


# A scripted fetch: each call takes the next response script. A script is a list of text
# chunks, optionally ending in a network error ({"error": true}), or an HTTP answer.
SCRIPTED = """
async ({ scripts, options }) => {
  const m = await import('/static/ssehub.js');
  const calls = [];
  const enc = new TextEncoder();
  const fakeFetch = async (url, init) => {
    calls.push({ url, method: init.method, lastEventId: init.headers['Last-Event-ID'] ?? null,
                 body: init.body ?? null });
    const script = scripts.shift();
    if (!script) throw new TypeError('no more scripts');
    if (script.throws) throw new TypeError('network down');
    if (script.status) {
      return new Response(script.body ?? null, { status: script.status,
        headers: { 'content-type': script.type ?? 'application/json' } });
    }
    const chunks = [...script.chunks];
    // One chunk per read; the error (or the end) comes after the reader has taken them all.
    return new Response(new ReadableStream({
      pull(controller) {
        if (chunks.length) controller.enqueue(enc.encode(chunks.shift()));
        else if (script.error) controller.error(new TypeError('connection reset'));
        else if (!script.hang) controller.close();
        else return new Promise(() => {});
      },
    }), { headers: { 'content-type': 'text/event-stream; charset=utf-8' } });
  };
  const events = [];
  const reconnects = [];
  const controller = new AbortController();
  const opts = {
    fetch: fakeFetch,
    signal: controller.signal,
    onEvent: (e) => {
      events.push(e.data);
      if (options.abortOn && e.data === options.abortOn) controller.abort();
    },
    onReconnect: (r) => {
      reconnects.push(Math.round(r.delay));
      if (options.abortOnReconnect) controller.abort();
    },
    ...options,
  };
  if (options.untilDone) opts.until = (e) => e.data === '[DONE]';
  if (options.resumeUrl) opts.resume = () => ({ url: options.resumeUrl });
  try {
    const result = await m.fetchEventStream('/start', opts);
    return { result, calls, events, reconnects };
  } catch (error) {
    return { error: { name: error.name, message: error.message, status: error.status },
             calls, events, reconnects };
  }
}
"""


def _run(js: Any, scripts: list[dict[str, Any]], **options: Any) -> dict[str, Any]:
    result: dict[str, Any] = js.evaluate(SCRIPTED, {"scripts": scripts, "options": options})
    return result


def test_resumes_through_the_resume_endpoint_with_the_last_id(js: Any) -> None:
    out = _run(
        js,
        [
            {
                "chunks": ["retry: 10\nid: 1\ndata: a\n\n", "id: 2\ndata: b\n\nid: 3\nda"],
                "error": True,
            },
            {"chunks": ["id: 3\ndata: c\n\n", "data: [DONE]\n\n"]},
        ],
        method="POST",
        body="{}",
        untilDone=True,
        resumeUrl="/resume",
    )
    assert out["events"] == ["a", "b", "c", "[DONE]"]
    assert out["calls"] == [
        {"url": "/start", "method": "POST", "lastEventId": None, "body": "{}"},
        {"url": "/resume", "method": "GET", "lastEventId": "2", "body": None},
    ]
    # The server's retry (10 ms) is the base; equal jitter keeps it in [5, 10].
    assert len(out["reconnects"]) == 1
    assert 5 <= out["reconnects"][0] <= 10
    assert out["result"] == {"outcome": "done", "lastEventId": "3", "reconnects": 1}


def test_without_resume_repeats_the_request_with_last_event_id(js: Any) -> None:
    out = _run(
        js,
        [{"chunks": ["id: 9\ndata: a\n\n"], "error": True}, {"chunks": ["data: [DONE]\n\n"]}],
        retry=5,
        untilDone=True,
    )
    assert [c["url"] for c in out["calls"]] == ["/start", "/start"]
    assert [c["lastEventId"] for c in out["calls"]] == [None, "9"]
    assert out["result"]["outcome"] == "done"


def test_backoff_doubles_and_gives_up(js: Any) -> None:
    out = _run(js, [{"throws": True}] * 4, retry=20, maxRetries=2, untilDone=True)
    assert out["error"]["name"] == "EventStreamError"
    assert "network down" in out["error"]["message"]
    assert len(out["calls"]) == 3
    low_high = [(20, 40), (40, 80)]
    assert len(out["reconnects"]) == 2
    for delay, (low, high) in zip(out["reconnects"], low_high, strict=True):
        assert low <= delay <= high


def test_a_stream_that_ends_before_done_is_resumed(js: Any) -> None:
    out = _run(
        js,
        [{"chunks": ["id: 1\ndata: a\n\n"]}, {"chunks": ["id: 2\ndata: [DONE]\n\n"]}],
        retry=5,
        untilDone=True,
        resumeUrl="/resume",
    )
    assert out["events"] == ["a", "[DONE]"]
    assert out["calls"][1]["lastEventId"] == "1"


def test_a_clean_end_is_the_end_without_until(js: Any) -> None:
    out = _run(js, [{"chunks": ["id: 1\ndata: a\n\n"]}])
    assert out["result"] == {"outcome": "ended", "lastEventId": "1", "reconnects": 0}


def test_client_errors_are_not_retried(js: Any) -> None:
    body = json.dumps({"error": {"message": "no such completion", "type": "not_found"}})
    out = _run(js, [{"status": 404, "body": body}], untilDone=True)
    assert out["error"] == {
        "name": "EventStreamError",
        "message": "HTTP 404: no such completion",
        "status": 404,
    }
    assert len(out["calls"]) == 1


def test_server_errors_are_retried(js: Any) -> None:
    out = _run(
        js,
        [{"status": 503, "body": "busy", "type": "text/plain"}, {"chunks": ["data: [DONE]\n\n"]}],
        retry=5,
        untilDone=True,
    )
    assert out["result"]["outcome"] == "done"
    assert len(out["calls"]) == 2


def test_not_an_event_stream_is_an_error(js: Any) -> None:
    out = _run(js, [{"status": 200, "body": "{}"}])
    assert out["error"]["message"] == "expected text/event-stream, got application/json"


def test_204_means_stop(js: Any) -> None:
    out = _run(js, [{"status": 204}], untilDone=True)
    assert out["result"] == {"outcome": "ended", "lastEventId": "", "reconnects": 0}
    assert len(out["calls"]) == 1


def test_abort_while_reading(js: Any) -> None:
    out = _run(js, [{"chunks": ["id: 1\ndata: a\n\n"], "hang": True}], abortOn="a", untilDone=True)
    assert out["result"] == {"outcome": "aborted", "lastEventId": "1", "reconnects": 0}


def test_abort_while_waiting_to_reconnect(js: Any) -> None:
    out = _run(js, [{"throws": True}], retry=60_000, untilDone=True, abortOnReconnect=True)
    assert out["result"]["outcome"] == "aborted"
    assert len(out["calls"]) == 1


def test_a_resumed_stream_keeps_the_id_it_resumed_from(js: Any) -> None:
    # Events without an `id` after a reconnect carry the resumed-from id (as browsers do),
    # so a second reconnect still resumes from there, not from the start.
    out = _run(
        js,
        [
            {"chunks": ["id: 5\ndata: a\n\n"], "error": True},
            {"chunks": ["data: b\n\n"], "error": True},
            {"chunks": ["data: [DONE]\n\n"]},
        ],
        retry=5,
        untilDone=True,
    )
    assert out["events"] == ["a", "b", "[DONE]"]
    assert [c["lastEventId"] for c in out["calls"]] == [None, "5", "5"]


def test_an_event_over_the_size_bound_fails_the_stream(js: Any) -> None:
    out = _run(
        js,
        [{"chunks": ["data: ok\n\n", "data: " + "x" * 50, "x" * 50, "\n\n"]}],
        maxEventSize=64,
        untilDone=True,
    )
    assert out["events"] == ["ok"]
    assert out["error"]["name"] == "EventStreamError"
    assert "exceeds maxEventSize" in out["error"]["message"]
    assert len(out["calls"]) == 1


def test_parser_bound_counts_data_lines_too(js: Any) -> None:
    result = js.evaluate(
        """async () => {
            const m = await import('/static/ssehub.js');
            const events = [];
            const p = new m.EventStreamParser((e) => events.push(e.data), { maxEventSize: 9 });
            p.feed('data: 12345\\n\\n');
            let error = null;
            try { p.feed('data: 1234\\ndata: 5678\\n'); } catch (e) { error = e.message; }
            p.feed('data: after\\n\\n');
            return { events, error };
        }"""
    )
    assert result["events"] == ["12345", "after"]
    assert "exceeds maxEventSize" in result["error"]
