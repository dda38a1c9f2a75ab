"""Fixtures for the browser tests: Debian's Chromium driven by Playwright, a real server."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from _support import require_binary, serve_in_process

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    # Module scope: Playwright's sync API owns an event loop while it runs, so it is
    # started and stopped around each module, never held across other tests.
    require_binary(CHROMIUM, "apt-get install -y chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    """A real `ssehub serve` with a quick demo model; yields its base URL."""
    with serve_in_process("--demo-delay", "0.02", "--log-level", "warning") as (url, _proc):
        yield url


class ConsoleLog:
    """Errors a page reported: console.error messages and uncaught exceptions."""

    def __init__(self) -> None:
        self.errors: list[str] = []

    def attach(self, page: Any) -> None:
        page.on(
            "console",
            lambda msg: (
                self.errors.append(f"console.{msg.type}: {msg.text} ({msg.location})")
                if msg.type in {"error", "assert"}
                else None
            ),
        )
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))


@pytest.fixture
def console() -> ConsoleLog:
    return ConsoleLog()


@pytest.fixture
def page(browser: Any, console: ConsoleLog) -> Iterator[Any]:
    """A fresh page (own context: own storage); fails the test if the page logged errors."""
    context = browser.new_context(viewport={"width": 1000, "height": 760})
    context.set_default_timeout(15_000)
    page = context.new_page()
    console.attach(page)
    try:
        yield page
    finally:
        context.close()
    assert console.errors == [], "the page logged errors:\n" + "\n".join(console.errors)
