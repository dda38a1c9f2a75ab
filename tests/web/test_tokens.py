"""The pages' key and token fields, in Chromium against `ssehub serve --api-key ...
--publish-token ...`: refused calls say so in place; with the key the pages work."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from _support import serve_in_process

pytestmark = pytest.mark.browser

KEY = "page-key"
KEYS = f"other-key,{KEY}"  # the page's key is the second of two
TOKEN = "job-token"
CHAT_STORE = "ssehub.chat.v1"
KEY_STORE = "ssehub.chat.api-key.v1"


@pytest.fixture(scope="module")
def locked() -> Iterator[str]:
    """A real server whose gateway needs a key and whose jobs need a publish token."""
    args = ["--demo-delay", "0.02", "--log-level", "warning"]
    args += ["--api-key", KEYS, "--publish-token", TOKEN]
    with serve_in_process(*args) as (url, _proc):
        yield url


def only_refusals_were_logged(console: Any) -> None:
    """Chromium logs each 401 response itself; those are expected, nothing else is."""
    assert console.errors, "expected Chromium to report the 401s"
    assert all("401" in error for error in console.errors), console.errors
    console.errors.clear()


def full_reply(server: str, messages: list[dict[str, str]]) -> str:
    response = httpx.post(
        server + "/v1/chat/completions",
        json={"model": "ssehub-demo", "messages": messages},
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    )
    response.raise_for_status()
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def stored(page: Any) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        page.evaluate(f"sessionStorage.getItem({json.dumps(CHAT_STORE)})")
    )
    return state


def send(page: Any, text: str) -> None:
    prompt = page.get_by_test_id("prompt")
    prompt.fill(text)
    prompt.press("Enter")


def wait_status(page: Any, status: str) -> None:
    page.wait_for_function(
        "(s) => document.querySelector('.message.assistant:last-child')?.dataset.status === s",
        arg=status,
        timeout=20_000,
    )


def wait_text(page: Any, test_id: str, part: str) -> None:
    page.wait_for_function(
        "([id, part]) => document.querySelector(`[data-testid=${id}]`)?.textContent.includes(part)",
        arg=[test_id, part],
    )


def test_chat_without_the_key_shows_the_refusal_in_place(
    page: Any, locked: str, console: Any
) -> None:
    page.goto(locked + "/")
    key = page.get_by_test_id("api-key")
    assert key.get_attribute("type") == "password"
    assert page.get_by_label("API key").count() == 1
    # The model list was refused: said in the status line, with the hint.
    wait_text(page, "status", "HTTP 401")
    status = page.get_by_test_id("status").text_content()
    assert "needs an API key" in status
    assert "API key field" in status
    # So is the message sent: the server's message in the reply, with the hint.
    send(page, "hi")
    wait_status(page, "error")
    error = page.get_by_test_id("reply-error").text_content()
    assert "HTTP 401: This server needs an API key" in error
    assert "API key field" in error
    assert key.get_attribute("aria-invalid") == "true"
    # A wrong key gets the server's other message.
    key.fill("not-the-key")
    assert key.get_attribute("aria-invalid") is None
    send(page, "hi again")
    page.wait_for_function("() => document.querySelectorAll('[data-testid=reply]').length === 2")
    wait_status(page, "error")
    assert "Incorrect API key" in page.get_by_test_id("reply-error").nth(1).text_content()
    assert key.get_attribute("aria-invalid") == "true"
    only_refusals_were_logged(console)


def test_chat_with_the_key_streams_resumes_after_reload_and_stops(
    page: Any, locked: str, console: Any
) -> None:
    page.goto(locked + "/")
    wait_text(page, "status", "HTTP 401")
    key = page.get_by_test_id("api-key")
    key.fill(KEY)
    key.press("Tab")  # `change`: the models are listed again, with the key
    page.wait_for_function(
        "() => document.querySelector('[data-testid=status]').textContent === ''"
    )
    assert page.evaluate(f"sessionStorage.getItem({json.dumps(KEY_STORE)})") == KEY

    # A reply streams; a reload mid-reply keeps the key and resumes with it.
    question = "What does the key unlock?"
    send(page, question)
    page.wait_for_function(
        """() => {
            const r = document.querySelector('[data-testid=reply]');
            return !!r && r.textContent.length > 20
                && r.closest('.message').dataset.status === 'streaming';
        }"""
    )
    page.reload()
    assert page.get_by_test_id("api-key").input_value() == KEY
    wait_status(page, "done")
    message = stored(page)["messages"][1]
    assert message["meta"]["resumed"] == 1
    assert message["content"] == full_reply(locked, [{"role": "user", "content": question}])
    assert page.get_by_test_id("reply-error").text_content() == ""

    # Stop cancels on the server, with the key.
    send(page, "Now a long answer, please")
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=reply]')[1]?.textContent.length > 10"
    )
    page.get_by_test_id("stop").click()
    wait_status(page, "stopped")
    completion_id = stored(page)["messages"][3]["completionId"]
    with httpx.stream(
        "GET",
        f"{locked}/v1/chat/completions/{completion_id}/stream",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=30,
    ) as response:
        assert response.status_code == 200
        body = response.read().decode()
    datas = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    assert json.loads(datas[-2])["error"]["code"] == "request"
    # New chat keeps the key.
    page.get_by_test_id("new-chat").click()
    page.reload()
    assert page.get_by_test_id("api-key").input_value() == KEY
    page.wait_for_function(
        "[...document.querySelectorAll('#model option')].some(o => o.value === 'ssehub-demo')"
    )
    assert page.get_by_test_id("status").text_content() == ""
    # Only the first load, before the key was typed, was refused.
    only_refusals_were_logged(console)


def test_jobs_page_starts_a_job_with_the_publish_token(
    page: Any, locked: str, console: Any
) -> None:
    page.goto(locked + "/jobs")
    token = page.get_by_test_id("token")
    assert token.get_attribute("type") == "password"
    assert page.get_by_label("Publish token").count() == 1
    page.get_by_label("Seconds per step").fill("0.05")
    page.get_by_test_id("start-job").click()
    wait_text(page, "status", "HTTP 401")
    status = page.get_by_test_id("status").text_content()
    assert "starting a job needs 'Authorization: Bearer <token>'" in status
    assert "publish token" in status
    assert token.get_attribute("aria-invalid") == "true"
    assert page.get_by_test_id("job").count() == 0

    token.fill(TOKEN)
    page.get_by_test_id("start-job").click()
    page.wait_for_function(
        "() => document.querySelector('[data-testid=job]')?.dataset.status === 'done'",
        timeout=30_000,
    )
    assert page.get_by_test_id("job-percent").text_content() == "100%"
    assert page.get_by_test_id("status").text_content() == ""
    assert token.get_attribute("aria-invalid") is None
    only_refusals_were_logged(console)
