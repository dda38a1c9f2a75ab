"""The channel monitor and the jobs page in Chromium against a real `ssehub serve`."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.browser

ROWS = "[...document.querySelectorAll('[data-testid=event]')]"


def channel_name() -> str:
    return f"web-test/{uuid.uuid4().hex[:8]}"


def rows(page: Any) -> list[dict[str, str]]:
    """The monitor's event rows, oldest first."""
    found: list[dict[str, str]] = page.evaluate(
        f"""{ROWS}.reverse().map((tr) => ({{
            id: tr.querySelector('.id').textContent,
            type: tr.querySelector('.type').textContent,
            data: tr.querySelector('.data').textContent,
            time: tr.querySelector('.time').textContent,
        }}))"""
    )
    return found


def wait_rows(page: Any, count: int) -> None:
    page.wait_for_function(f"() => {ROWS}.length >= {count}", timeout=20_000)


def wait_state(page: Any, state: str) -> None:
    page.wait_for_function(
        "(s) => document.querySelector('[data-testid=state]').dataset.state === s",
        arg=state,
        timeout=20_000,
    )


def subscribe(page: Any, server: str, name: str, transport: str = "fetch", **opts: Any) -> None:
    page.goto(server + "/monitor")
    page.get_by_label("Channel").fill(name)
    page.get_by_label("Transport").select_option(transport)
    if opts.get("cursor"):
        page.get_by_label("After event id").fill(opts["cursor"])
    if opts.get("from_start"):
        page.get_by_label("Replay retained").check()
    page.get_by_test_id("subscribe").click()
    wait_state(page, "open")


def publish(server: str, name: str, body: Any) -> list[str]:
    if isinstance(body, str):
        response = httpx.post(f"{server}/channels/{name}", content=body)
    else:
        response = httpx.post(f"{server}/channels/{name}", json=body)
    response.raise_for_status()
    ids: list[str] = response.json()["ids"]
    return ids


@pytest.mark.parametrize("transport", ["fetch", "eventsource"])
def test_monitor_shows_events_published_over_http(page: Any, server: str, transport: str) -> None:
    name = channel_name()
    subscribe(page, server, name, transport)
    (first,) = publish(server, name, "plain text")
    (second,) = publish(server, name, {"data": {"n": 1}})
    (third,) = publish(server, name, "two\nlines")
    wait_rows(page, 3)
    got = rows(page)
    assert [(r["id"], r["type"], r["data"]) for r in got] == [
        (first, "message", "plain text"),
        (second, "message", '{"n":1}'),
        (third, "message", "two\nlines"),
    ]
    assert all(r["time"] for r in got)
    assert page.get_by_test_id("last-id").text_content() == third
    assert page.get_by_test_id("count").text_content() == "3"


def test_fetch_transport_shows_every_event_type(page: Any, server: str) -> None:
    name = channel_name()
    subscribe(page, server, name, "fetch")
    ids = publish(
        server, name, [{"data": "a", "event": "greeting"}, {"data": "b", "event": "update"}]
    )
    wait_rows(page, 2)
    assert [(r["id"], r["type"], r["data"]) for r in rows(page)] == [
        (ids[0], "greeting", "a"),
        (ids[1], "update", "b"),
    ]


def test_publish_form(page: Any, server: str) -> None:
    name = channel_name()
    subscribe(page, server, name)
    page.get_by_label("Event type").fill("note")
    page.get_by_label("Data").fill("from the form")
    page.get_by_test_id("publish").click()
    wait_rows(page, 1)
    (row,) = rows(page)
    assert (row["type"], row["data"]) == ("note", "from the form")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=publish-result]').textContent.includes('id')"
    )
    assert row["id"] in page.get_by_test_id("publish-result").text_content()


@pytest.mark.parametrize("transport", ["fetch", "eventsource"])
def test_reconnects_are_visible_and_lose_nothing(page: Any, server: str, transport: str) -> None:
    name = channel_name()
    subscribe(page, server, name, transport)
    published = publish(server, name, "before the drop")
    wait_rows(page, 1)
    (connection,) = httpx.get(server + "/admin/connections", params={"channel": name}).json()[
        "connections"
    ]
    dropped = httpx.delete(f"{server}/admin/connections/{connection['id']}")
    assert dropped.status_code == 200
    # Published while the page is away: it must arrive once, after the reconnect.
    published += publish(server, name, "while away")
    page.wait_for_function(
        "() => Number(document.querySelector('[data-testid=reconnects]').textContent) >= 1",
        timeout=20_000,
    )
    wait_state(page, "open")
    published += publish(server, name, "after the reconnect")
    wait_rows(page, 3)
    assert [r["id"] for r in rows(page)] == published
    assert [r["data"] for r in rows(page)] == [
        "before the drop",
        "while away",
        "after the reconnect",
    ]


@pytest.mark.parametrize("transport", ["fetch", "eventsource"])
def test_closing_the_channel_ends_the_subscription(page: Any, server: str, transport: str) -> None:
    name = channel_name()
    subscribe(page, server, name, transport)
    page.get_by_test_id("close-channel").click()
    wait_state(page, "closed")
    wait_rows(page, 1)
    assert rows(page)[-1]["type"] == "close"
    assert "closed" in page.get_by_test_id("notice").text_content()
    assert page.get_by_test_id("unsubscribe").is_disabled()


def test_replay_from_the_start_and_a_gap(page: Any, server: str) -> None:
    name = channel_name()
    ids = publish(server, name, [{"data": "one"}, {"data": "two"}])
    subscribe(page, server, name, from_start=True)
    wait_rows(page, 2)
    assert [r["id"] for r in rows(page)] == ids
    # A cursor the channel never handed out: told in-band, then the retained events.
    subscribe(page, server, name, cursor="no-such-id")
    wait_rows(page, 3)
    got = rows(page)
    assert got[0]["type"] == "ssehub.gap"
    assert [r["id"] for r in got[1:]] == ids
    assert "retained" in page.get_by_test_id("notice").text_content()


def test_job_progress_fills_to_100(page: Any, server: str) -> None:
    page.goto(server + "/jobs")
    page.get_by_label("Seconds per step").fill("0.1")
    # Record every value the bar shows, to see it fill step by step.
    page.evaluate(
        """() => {
            window.seen = [];
            new MutationObserver(() => {
                const bar = document.querySelector('[data-testid=job-progress]');
                if (bar && window.seen.at(-1) !== bar.value) window.seen.push(bar.value);
            }).observe(document.body, { subtree: true, childList: true, characterData: true });
        }"""
    )
    page.get_by_test_id("start-job").click()
    job = page.get_by_test_id("job")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=job]')?.dataset.status === 'done'",
        timeout=30_000,
    )
    assert job.get_by_test_id("job-percent").text_content() == "100%"
    assert job.get_by_test_id("job-progress").evaluate("(bar) => bar.value") == 100
    seen = page.evaluate("window.seen")
    assert seen == sorted(seen)
    assert any(0 < value < 100 for value in seen), seen
    assert seen[-1] == 100


def test_a_late_jobs_page_shows_the_final_state(page: Any, server: str) -> None:
    started = httpx.post(server + "/demo/jobs", json={"delay": 0}).json()
    with httpx.stream("GET", server + started["events"], timeout=30) as response:
        for line in response.iter_lines():
            if line == "event: close":
                break
    page.goto(f"{server}/jobs?job={started['id']}")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=job]')?.dataset.status === 'done'"
    )
    assert page.get_by_test_id("job-percent").text_content() == "100%"
