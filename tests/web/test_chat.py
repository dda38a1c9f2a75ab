"""The chat page in Chromium against a real `ssehub serve` with the demo model."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

STORE_KEY = "ssehub.chat.v1"


def full_reply(server: str, messages: list[dict[str, str]]) -> str:
    """The demo model's whole reply to `messages`, asked for without streaming."""
    response = httpx.post(
        server + "/v1/chat/completions",
        json={"model": "ssehub-demo", "messages": messages, "stream": False},
        timeout=30,
    )
    response.raise_for_status()
    content: str = response.json()["choices"][0]["message"]["content"]
    return content


def stored(page: Any) -> dict[str, Any]:
    raw = page.evaluate(f"sessionStorage.getItem({json.dumps(STORE_KEY)})")
    state: dict[str, Any] = json.loads(raw)
    return state


def rendered(page: Any, markdown: str) -> str:
    """The text `markdown` renders to with the page's own renderer."""
    text: str = page.evaluate(
        """async (source) => {
            const { renderMarkdown } = await import('/static/markdown.js');
            const div = document.createElement('div');
            renderMarkdown(source, div);
            return div.textContent;
        }""",
        markdown,
    )
    return text


def reply_length(page: Any) -> int:
    length: int = page.evaluate("document.querySelector('[data-testid=reply]').textContent.length")
    return length


def wait_streaming_longer_than(page: Any, length: int) -> None:
    """Wait until the reply holds more than `length` characters and is still streaming."""
    page.wait_for_function(
        """(n) => {
            const r = document.querySelector('[data-testid=reply]');
            return !!r && r.textContent.length > n
                && r.closest('.message').dataset.status === 'streaming';
        }""",
        arg=length,
    )


def send(page: Any, text: str) -> None:
    prompt = page.get_by_test_id("prompt")
    prompt.fill(text)
    prompt.press("Enter")


def wait_status(page: Any, status: str, timeout: float = 20_000) -> None:
    page.wait_for_function(
        "(s) => document.querySelector('.message.assistant:last-child')?.dataset.status === s",
        arg=status,
        timeout=timeout,
    )


def test_reply_streams_in_progressively(page: Any, server: str) -> None:
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelector('[data-testid=model]').options.length > 0")
    send(page, "Tell me about server-sent events")
    reply = page.get_by_test_id("reply")
    # Seen partly written and still streaming...
    wait_streaming_longer_than(page, 0)
    first = reply_length(page)
    # ...then longer, still streaming: it grows over time, not in one piece.
    wait_streaming_longer_than(page, first)
    assert page.get_by_test_id("stop").is_enabled()
    assert page.get_by_test_id("send").is_disabled()
    wait_status(page, "done")
    expected = full_reply(server, [{"role": "user", "content": "Tell me about server-sent events"}])
    assert stored(page)["messages"][1]["content"] == expected
    assert reply.text_content() == rendered(page, expected)
    assert len(expected) > first
    meta = page.get_by_test_id("reply-meta").text_content()
    assert "first token" in meta
    assert "completion tokens" in meta
    assert page.get_by_test_id("send").is_enabled()
    assert page.get_by_test_id("stop").is_disabled()
    # The streaming region is announced politely and marked busy only while it streams.
    assert page.get_by_test_id("conversation").get_attribute("aria-live") == "polite"
    assert reply.get_attribute("aria-busy") == "false"


def test_shift_enter_adds_a_line_and_a_second_turn_uses_the_history(page: Any, server: str) -> None:
    page.goto(server + "/")
    prompt = page.get_by_test_id("prompt")
    prompt.fill("first")
    prompt.press("Enter")
    wait_status(page, "done")
    first_reply = stored(page)["messages"][1]["content"]
    prompt.type("line one")
    prompt.press("Shift+Enter")
    prompt.type("line two")
    assert prompt.input_value() == "line one\nline two"
    page.get_by_test_id("send").click()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=reply]').length === 2")
    wait_status(page, "done")
    history = [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": first_reply},
        {"role": "user", "content": "line one\nline two"},
    ]
    assert stored(page)["messages"][3]["content"] == full_reply(server, history)
    assert page.locator(".message.user .content").nth(1).text_content() == "line one\nline two"


def test_stop_cancels_the_generation(page: Any, server: str) -> None:
    page.goto(server + "/")
    send(page, "Please write a long answer")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=reply]')?.textContent.length > 10"
    )
    page.get_by_test_id("stop").click()
    wait_status(page, "stopped")
    message = stored(page)["messages"][1]
    completion_id = message["completionId"]
    shown = message["content"]
    expected = full_reply(server, [{"role": "user", "content": "Please write a long answer"}])
    assert expected.startswith(shown)
    assert len(shown) < len(expected)
    assert "stopped" in page.get_by_test_id("reply-meta").text_content()
    # The server stopped generating too: the completion's log ends with a cancellation,
    # short of the full reply.
    with httpx.stream(
        "GET", f"{server}/v1/chat/completions/{completion_id}/stream", timeout=30
    ) as response:
        assert response.status_code == 200
        body = response.read().decode()
    datas = [line[6:] for line in body.splitlines() if line.startswith("data: ")]
    assert datas[-1] == "[DONE]"
    error = json.loads(datas[-2])["error"]
    assert error["code"] == "request"
    logged = "".join(
        choice["delta"].get("content") or ""
        for data in datas[:-2]
        for choice in json.loads(data).get("choices", [])
    )
    assert expected.startswith(logged)
    assert len(logged) < len(expected)
    assert page.get_by_test_id("send").is_enabled()


def test_reload_mid_reply_resumes_with_nothing_lost_or_doubled(page: Any, server: str) -> None:
    page.goto(server + "/")
    send(page, "What happens if I reload?")
    wait_streaming_longer_than(page, 20)
    before = stored(page)["messages"][1]["content"]
    page.reload()
    # After the reload the partial reply is back at once and continues to the end.
    wait_status(page, "done")
    message = stored(page)["messages"][1]
    expected = full_reply(server, [{"role": "user", "content": "What happens if I reload?"}])
    assert len(before) < len(expected)
    assert message["meta"]["resumed"] == 1
    assert message["content"] == expected
    assert page.get_by_test_id("reply").text_content() == rendered(page, expected)
    assert "resumed" in page.get_by_test_id("reply-meta").text_content()
    # The conversation itself survived the reload.
    assert page.locator(".message.user .content").text_content() == "What happens if I reload?"


def test_history_survives_reload_and_new_chat_clears_it(page: Any, server: str) -> None:
    page.goto(server + "/")
    send(page, "hello")
    wait_status(page, "done")
    page.reload()
    page.wait_for_function("() => document.querySelectorAll('[data-testid=reply]').length === 1")
    assert page.locator(".message.user .content").text_content() == "hello"
    page.get_by_test_id("new-chat").click()
    assert page.get_by_test_id("reply").count() == 0
    page.reload()
    assert page.get_by_test_id("reply").count() == 0


def test_models_are_listed(page: Any, server: str) -> None:
    page.goto(server + "/")
    page.wait_for_function(
        "[...document.querySelectorAll('#model option')].some(o => o.value === 'ssehub-demo')"
    )
    models = httpx.get(server + "/v1/models").json()["data"]
    options = page.locator("#model option").evaluate_all("(os) => os.map((o) => o.value)")
    assert options == [m["id"] for m in models]


def test_errors_show_in_place(page: Any, server: str, console: Any) -> None:
    page.goto(server + "/")
    page.wait_for_function("() => document.querySelector('#model').options.length > 0")
    # A model the server does not have: the 404 and its message appear in the reply.
    page.evaluate(
        """() => {
            const o = document.createElement('option');
            o.value = o.textContent = 'no-such-model';
            document.querySelector('#model').append(o);
            document.querySelector('#model').value = 'no-such-model';
        }"""
    )
    send(page, "hi")
    wait_status(page, "error")
    error = page.get_by_test_id("reply-error")
    assert error.get_attribute("role") == "alert"
    assert "HTTP 404" in error.text_content()
    assert "no-such-model" in error.text_content()
    # Chromium reports the 404 itself; that one is expected.
    assert all("404" in e for e in console.errors), console.errors
    console.errors.clear()


def test_markdown_from_the_model_cannot_inject_html(page: Any, server: str) -> None:
    page.goto(server + "/")
    hostile = (
        "# Title\n\n**bold** and `<b>code</b>` <img src=x onerror=alert(1)>\n\n"
        "- [ok](https://example.com)\n- [bad](javascript:alert(1))\n\n"
        "```\n<script>alert(1)</script>\n```"
    )
    html = page.evaluate(
        """async (source) => {
            const { renderMarkdown } = await import('/static/markdown.js');
            const div = document.createElement('div');
            renderMarkdown(source, div);
            return div.innerHTML;
        }""",
        hostile,
    )
    assert "<img" not in html
    assert "<script" not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "<strong>bold</strong>" in html
    assert "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert 'href="https://example.com"' in html
    assert "javascript:" not in html.replace("[bad](javascript:alert(1))", "")
    assert "<h3>Title</h3>" in html


def test_keyboard_only(page: Any, server: str) -> None:
    page.goto(server + "/")
    # The message box has the focus on load; Enter sends, Escape stops.
    assert page.evaluate("document.activeElement.dataset.testid") == "prompt"
    page.keyboard.type("Stop me with the keyboard")
    page.keyboard.press("Enter")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=reply]')?.textContent.length > 5"
    )
    page.keyboard.press("Escape")
    wait_status(page, "stopped")
    assert page.get_by_label("Message").get_attribute("data-testid") == "prompt"
    assert page.get_by_label("Model").get_attribute("data-testid") == "model"


def test_an_error_after_the_stream_started_shows_in_place(page: Any, server: str) -> None:
    page.goto(server + "/")
    send(page, "Cancel me from elsewhere")
    wait_streaming_longer_than(page, 10)
    completion_id = stored(page)["messages"][1]["completionId"]
    # Another client cancels it: the stream carries an error event, then ends.
    cancelled = httpx.post(f"{server}/v1/chat/completions/{completion_id}/cancel")
    assert cancelled.status_code == 200
    wait_status(page, "error")
    assert "cancelled" in page.get_by_test_id("reply-error").text_content()
    message = stored(page)["messages"][1]
    assert message["content"]
    assert page.get_by_test_id("reply").text_content() == rendered(page, message["content"])
    assert page.get_by_test_id("send").is_enabled()
