"""Streams that survive: ids on every event, resume by Last-Event-ID while generating and
after, from another client; retention."""

from __future__ import annotations

import json

import httpx
from sse import chunks, iter_events, post_stream, text_of

from conftest import ServeGateway
from ssehub.broker import parse_id
from ssehub.protocol import ServerSentEvent

from _support import wait_for

MESSAGES = [{"role": "user", "content": "Tell me about resuming streams"}]
BODY = {"model": "ssehub-demo", "messages": MESSAGES, "stream": True}


def full_reply(url: str) -> str:
    whole = httpx.post(url + "/v1/chat/completions", json={**BODY, "stream": False})
    content: str = whole.json()["choices"][0]["message"]["content"]
    return content


def keys(events: list[ServerSentEvent]) -> list[tuple[int, int]]:
    result = []
    for event in events:
        key = parse_id(event.id or "")
        assert key is not None, f"event without a stream id: {event}"
        result.append(key)
    return result


def resume(url: str, completion_id: str, **kwargs: object) -> list[ServerSentEvent]:
    with httpx.stream(
        "GET", f"{url}/v1/chat/completions/{completion_id}/stream", timeout=30, **kwargs
    ) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        return list(iter_events(response))


def test_drop_mid_stream_and_resume(serve_gateway: ServeGateway) -> None:
    with serve_gateway(demo_delay=0.01) as url:
        expected = full_reply(url)
        first: list[ServerSentEvent] = []
        with httpx.stream("POST", url + "/v1/chat/completions", json=BODY, timeout=30) as response:
            completion_id = response.headers["ssehub-completion-id"]
            for event in iter_events(response):
                first.append(event)
                if len(first) == 20:
                    break  # the connection drops here, mid-reply
        rest = resume(url, completion_id, headers={"last-event-id": first[-1].id or ""})
    # Still generating when resumed: the reply was far from done after 20 events.
    assert len(rest) > 40
    events = first + rest
    ordered = keys(events)
    assert ordered == sorted(set(ordered)), "no event lost or repeated, all in order"
    assert events[-1].data == "[DONE]"
    objects = chunks(events)
    assert text_of(objects) == expected
    assert {o["id"] for o in objects} == {completion_id}


def test_resume_after_finish_from_another_client(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        response, events = post_stream(url, BODY)
        completion_id = json.loads(events[0].data)["id"]
        assert response.headers["ssehub-completion-id"] == completion_id
        location = f"/v1/chat/completions/{completion_id}/stream"
        assert response.headers["content-location"] == location
        # Another program, later: a whole replay, and a replay after a cursor (query form).
        replay = resume(url, completion_id)
        after = resume(url, completion_id, params={"last_event_id": events[4].id})
        header_wins = resume(
            url,
            completion_id,
            params={"last_event_id": events[1].id},
            headers={"last-event-id": events[4].id or ""},
        )
    assert [(e.id, e.data) for e in replay] == [(e.id, e.data) for e in events]
    assert [(e.id, e.data) for e in after] == [(e.id, e.data) for e in events[5:]]
    assert [e.id for e in header_wins] == [e.id for e in after]
    assert after[-1].data == "[DONE]"


def test_unknown_completion_and_unknown_cursor(serve_gateway: ServeGateway) -> None:
    with serve_gateway() as url:
        missing = httpx.get(url + "/v1/chat/completions/chatcmpl-nope/stream")
        bad_name = httpx.get(url + "/v1/chat/completions/a%20b/stream")
        _, events = post_stream(url, BODY)
        completion_id = json.loads(events[0].data)["id"]
        gapped = resume(url, completion_id, headers={"last-event-id": "not-an-id"})
    for response in (missing, bad_name):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "completion_not_found"
    # A cursor that is not of this stream: told so in-band, then the whole stream.
    assert gapped[0].event == "ssehub.gap"
    assert json.loads(gapped[0].data) == {"last_event_id": "not-an-id", "oldest_id": events[0].id}
    assert [e.data for e in gapped[1:]] == [e.data for e in events]


def test_finished_completion_expires_after_retention(serve_gateway: ServeGateway) -> None:
    with serve_gateway(completion_retention=0.3) as url:
        _, events = post_stream(url, BODY)
        completion_id = json.loads(events[0].data)["id"]
        stream_url = f"{url}/v1/chat/completions/{completion_id}/stream"
        wait_for(lambda: httpx.get(stream_url).status_code == 404, 10, 0.05, "expiry")


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_ssehub_client_resumes_a_dropped_post(serve_gateway: ServeGateway) -> None:
    from cutting_proxy import cutting_proxy

    from ssehub.client import connect, iter_openai

    with serve_gateway(demo_delay=0.005) as url:
        expected = full_reply(url)
        with cutting_proxy(_port(url), cut_after=3000) as (proxy, relayed):
            source = connect(proxy + "/v1/chat/completions", method="POST", json=BODY)
            with source:
                objects = list(iter_openai(source))
    assert len(relayed) == 2, "dropped once, resumed once"
    assert text_of(objects) == expected
    assert len({o["id"] for o in objects}) == 1


def test_chat_cli_resumes_a_dropped_reply(serve_gateway: ServeGateway) -> None:
    from click.testing import CliRunner
    from cutting_proxy import cutting_proxy

    from ssehub.cli import main

    with serve_gateway(demo_delay=0.005) as url:
        expected = full_reply(url)
        with cutting_proxy(_port(url), cut_after=3000) as (proxy, relayed):
            prompt = MESSAGES[0]["content"]
            result = CliRunner().invoke(main, ["chat", prompt, "--server", proxy])
    assert result.exit_code == 0, result.output
    assert len(relayed) == 2
    assert result.stdout.strip() == expected
