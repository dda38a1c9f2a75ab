"""Every page: labelled controls, keyboard reachable, no sideways scrolling on a phone."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.browser

PAGES = ["/", "/monitor", "/jobs"]

UNLABELLED = """() => [...document.querySelectorAll('input, select, textarea, button')]
    .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                    && !(el.tagName === 'BUTTON' && el.textContent.trim()))
    .map((el) => el.outerHTML)"""


@pytest.mark.parametrize("path", PAGES)
def test_controls_are_labelled_and_reachable_by_keyboard(page: Any, server: str, path: str) -> None:
    page.goto(server + path)
    assert page.evaluate(UNLABELLED) == []
    assert page.locator("html").get_attribute("lang") == "en"
    assert page.locator("main").count() == 1
    # Tabbing visits every enabled control.
    controls = page.evaluate(
        """() => [...document.querySelectorAll('input, select, textarea, button, a[href]')]
            .filter((el) => !el.disabled && el.offsetParent !== null).length"""
    )
    visited = set()
    for _ in range(controls + 3):
        page.keyboard.press("Tab")
        visited.add(page.evaluate("() => document.activeElement.outerHTML"))
    assert len(visited) >= controls


@pytest.mark.parametrize("path", PAGES)
def test_fits_a_phone(browser: Any, server: str, path: str) -> None:
    context = browser.new_context(viewport={"width": 360, "height": 740}, is_mobile=True)
    try:
        page = context.new_page()
        page.goto(server + path)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 360
    finally:
        context.close()
