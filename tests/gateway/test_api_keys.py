"""Client keys (`--api-key`): every /v1 route needs one of them; they stay with the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pytest
from click.testing import CliRunner
from fake_upstream import TEXT_PIECES, FakeUpstream
from sse import chunks, iter_events, post_stream, text_of

from conftest import ServeGateway
from ssehub.cli import main

from _support import serve_in_thread

KEYS = " k-first , ,k-second,"  # empty entries are ignored
FIRST, SECOND = "k-first", "k-second"
MESSAGES = [{"role": "user", "content": "Who may ask?"}]
CHAT = {"model": "ssehub-demo", "messages": MESSAGES}

# Every /v1 route, as (method, path, JSON body); ids need not exist: the key comes first.
ROUTES: list[tuple[str, str, Any]] = [
    ("POST", "/v1/chat/completions", {**CHAT, "stream": True}),
    ("POST", "/v1/completions", {"model": "ssehub-demo", "prompt": "hi"}),
    ("GET", "/v1/models", None),
    ("GET", "/v1/chat/completions/chatcmpl-0/stream", None),
    ("GET", "/v1/completions/cmpl-0/stream", None),
    ("POST", "/v1/chat/completions/chatcmpl-0/cancel", None),
    ("POST", "/v1/completions/cmpl-0/cancel", None),
]


def bearer(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


def test_every_v1_route_answers_401_without_a_right_key(serve_gateway: ServeGateway) -> None:
    refused = [
        ({}, "Bearer", "needs an API key"),
        ({"authorization": "Bearer"}, "Bearer", "needs an API key"),
        ({"authorization": f"Basic {FIRST}"}, "Bearer", "needs an API key"),
        (bearer("k-wrong"), 'Bearer error="invalid_token"', "Incorrect API key"),
        (bearer(FIRST + "x"), 'Bearer error="invalid_token"', "Incorrect API key"),
        (bearer(KEYS), 'Bearer error="invalid_token"', "Incorrect API key"),
    ]
    with serve_gateway(api_key=KEYS) as url, httpx.Client(base_url=url, timeout=30) as client:
        for method, path, body in ROUTES:
            for headers, challenge, message in refused:
                response = client.request(method, path, json=body, headers=headers)
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == challenge
                assert response.headers["content-type"] == "application/json"
                error = response.json()["error"]
                assert error == {
                    "message": error["message"],
                    "type": "invalid_request_error",
                    "param": None,
                    "code": "invalid_api_key",
                }
                assert message in error["message"]
                # The key given is never echoed back.
                assert "k-" not in error["message"]
        # The pages and the probes stay open.
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/").status_code == 200
        assert client.get("/static/chat.js").status_code == 200


def test_either_key_streams_resumes_and_cancels(serve_gateway: ServeGateway) -> None:
    with serve_gateway(api_key=KEYS, demo_delay=0.02) as url:
        first, events = post_stream(url, CHAT, headers=bearer(FIRST))
        assert first.status_code == 200
        assert events[-1].data == "[DONE]"
        completion_id = first.headers["ssehub-completion-id"]
        # The second key works as well as the first, on the resume endpoint too.
        with httpx.stream(
            "GET",
            f"{url}/v1/chat/completions/{completion_id}/stream",
            headers=bearer(SECOND),
            timeout=30,
        ) as replay:
            assert replay.status_code == 200
            replayed = list(iter_events(replay))
        assert text_of(chunks(replayed)) == text_of(chunks(events))
        # Bearer is case-insensitive (RFC 9110 11.1).
        legacy = httpx.post(
            url + "/v1/completions",
            json={"model": "ssehub-demo", "prompt": "hi"},
            headers={"authorization": f"bearer {SECOND}"},
            timeout=30,
        )
        assert legacy.status_code == 200
        assert legacy.json()["object"] == "text_completion"
        models = httpx.get(url + "/v1/models", headers=bearer(SECOND), timeout=30)
        assert models.status_code == 200
        assert [m["id"] for m in models.json()["data"]] == ["ssehub-demo"]

        # A cancel with a key stops a running completion.
        with httpx.stream(
            "POST",
            url + "/v1/chat/completions",
            json={**CHAT, "stream": True},
            headers=bearer(SECOND),
            timeout=30,
        ) as running:
            assert running.status_code == 200
            running_id = running.headers["ssehub-completion-id"]
            cancel_path = f"/v1/chat/completions/{running_id}/cancel"
            denied = httpx.post(url + cancel_path, timeout=30)
            assert denied.status_code == 401
            cancelled = httpx.post(url + cancel_path, headers=bearer(FIRST), timeout=30)
            assert cancelled.status_code == 200
            assert cancelled.json() == {
                "id": running_id,
                "object": "completion.cancel",
                "cancelled": True,
            }
            rest = list(iter_events(running))
    errors = [json.loads(e.data)["error"] for e in rest if '"error"' in e.data]
    assert [error["code"] for error in errors] == ["request"]
    assert rest[-1].data == "[DONE]"


def test_openai_sdk_with_the_key_and_with_a_wrong_one(serve_gateway: ServeGateway) -> None:
    with serve_gateway(api_key=KEYS) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key=SECOND, max_retries=0)
        stream = client.chat.completions.create(
            model="ssehub-demo",
            messages=MESSAGES,  # type: ignore[arg-type]
            stream=True,
        )
        text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        listed = [m.id for m in client.models.list()]
        wrong = openai.OpenAI(base_url=url + "/v1", api_key="k-wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as raised:
            wrong.chat.completions.create(model="ssehub-demo", messages=MESSAGES)  # type: ignore[arg-type]
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
    assert "ssehub-demo" in text
    assert listed == ["ssehub-demo"]
    assert raised.value.status_code == 401
    assert raised.value.code == "invalid_api_key"
    assert raised.value.type == "invalid_request_error"


class Recording:
    """An ASGI app in front of another, recording each request's headers (models too)."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.requests: list[tuple[str, dict[str, str]]] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            headers = {k.decode(): v.decode() for k, v in scope["headers"]}
            self.requests.append((scope["path"], headers))
        await self.app(scope, receive, send)


@pytest.fixture
def recorded_upstream() -> Iterator[tuple[str, Recording]]:
    recording = Recording(FakeUpstream())
    with serve_in_thread(recording) as url:
        yield url + "/v1", recording


def _relay_all(url: str, headers: dict[str, str]) -> None:
    """A streamed and a whole chat completion, a legacy one and the model list."""
    _, events = post_stream(url, {"model": "fake-text", "messages": MESSAGES}, headers=headers)
    assert text_of(chunks(events)) == "".join(TEXT_PIECES)
    whole = httpx.post(
        url + "/v1/chat/completions",
        json={"model": "fake-text", "messages": MESSAGES},
        headers=headers,
        timeout=30,
    )
    assert whole.status_code == 200
    legacy = httpx.post(
        url + "/v1/completions",
        json={"model": "fake-text", "prompt": "hi", "stream": True},
        headers=headers,
        timeout=30,
    )
    assert legacy.status_code == 200
    models = httpx.get(url + "/v1/models", headers=headers, timeout=30).json()["data"]
    assert "fake-text" in [m["id"] for m in models]


def test_the_client_key_is_not_forwarded_upstream(
    serve_gateway: ServeGateway, recorded_upstream: tuple[str, Recording]
) -> None:
    upstream, recording = recorded_upstream
    with serve_gateway(upstream=upstream, api_key=KEYS) as url:
        _relay_all(url, bearer(FIRST))
    paths = [path for path, _ in recording.requests]
    assert sorted(set(paths)) == ["/v1/chat/completions", "/v1/completions", "/v1/models"]
    assert [h.get("authorization") for _, h in recording.requests] == [None] * len(paths)


def test_the_upstream_key_is_sent_instead(
    serve_gateway: ServeGateway, recorded_upstream: tuple[str, Recording]
) -> None:
    upstream, recording = recorded_upstream
    with serve_gateway(upstream=upstream, api_key=KEYS, upstream_api_key="up-key") as url:
        _relay_all(url, bearer(SECOND))
    assert len(recording.requests) == 4
    assert all(h["authorization"] == "Bearer up-key" for _, h in recording.requests)


def test_without_client_keys_the_clients_authorization_is_forwarded_as_before(
    serve_gateway: ServeGateway, recorded_upstream: tuple[str, Recording]
) -> None:
    upstream, recording = recorded_upstream
    with serve_gateway(upstream=upstream) as url:
        _relay_all(url, bearer("sk-mine"))
    assert len(recording.requests) == 4
    assert all(h["authorization"] == "Bearer sk-mine" for _, h in recording.requests)


@pytest.mark.parametrize("value", [",", " , ,", ""])
def test_serve_with_no_usable_key_is_a_usage_error(value: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ssehub", "serve", "--api-key", value],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert "--api-key" in result.stderr
    assert "holds no key" in result.stderr
    assert "Traceback" not in result.stderr


def test_chat_cli_sends_the_key(serve_gateway: ServeGateway) -> None:
    no_keys_in_env: dict[str, str | None] = {"SSEHUB_API_KEY": None, "OPENAI_API_KEY": None}
    runner = CliRunner(env=no_keys_in_env)
    with serve_gateway(api_key=KEYS) as url:
        given = runner.invoke(main, ["chat", "hi", "--server", url, "--api-key", SECOND])
        missing = runner.invoke(main, ["chat", "hi", "--server", url])
        wrong = runner.invoke(main, ["chat", "hi", "--server", url, "--api-key", "k-wrong"])
        # SSEHUB_API_KEY wins over OPENAI_API_KEY; a list like the server's sends its first.
        both = CliRunner(env={"SSEHUB_API_KEY": KEYS, "OPENAI_API_KEY": "sk-for-openai"})
        from_env = both.invoke(main, ["chat", "hi", "--server", url])
        openai_only = CliRunner(env={"SSEHUB_API_KEY": None, "OPENAI_API_KEY": FIRST})
        from_openai_env = openai_only.invoke(main, ["chat", "hi", "--server", url])
    for ok in (given, from_env, from_openai_env):
        assert ok.exit_code == 0, ok.output
        assert "ssehub-demo" in ok.stdout
    for refused, what in ((missing, "needs an API key"), (wrong, "Incorrect API key")):
        assert refused.exit_code == 1
        assert refused.stdout == ""
        line = refused.stderr.strip()
        assert "\n" not in line
        assert line.startswith("Error: 401 Unauthorized: ")
        assert what in line
        assert "--api-key" in line
