"""Take docs/screenshot-chat.png: the chat page with one finished reply and one streaming.

Runs a real `ssehub serve` (demo model) on a free port and drives Debian's Chromium:

    .venv/bin/python docs/make_screenshot.py [--out docs/screenshot-chat.png] [--width 1000]
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from pathlib import Path

from playwright.sync_api import sync_playwright

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise SystemExit(f"ssehub serve did not start on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).with_name("screenshot-chat.png")))
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=720)
    options = parser.parse_args()

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "ssehub", "serve", "--port", str(port), "--demo-delay", "0.04"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port(port)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
            page = browser.new_page(
                viewport={"width": options.width, "height": options.height},
                color_scheme="light",
            )
            page.goto(f"http://127.0.0.1:{port}/")
            prompt = page.get_by_test_id("prompt")
            prompt.fill("What is ssehub?")
            prompt.press("Enter")
            page.wait_for_function(
                "() => document.querySelector('.message.assistant:last-child')"
                "?.dataset.status === 'done'",
                timeout=60_000,
            )
            prompt.fill("And what happens if I reload the page now?")
            prompt.press("Enter")
            # Mid-reply: the typewriter effect, with the Stop button live.
            page.wait_for_function(
                "() => { const r = document.querySelectorAll('[data-testid=reply]')[1];"
                " return !!r && r.textContent.length > 140; }",
                timeout=60_000,
            )
            page.screenshot(path=options.out)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=15)
    print(f"wrote {options.out}")


if __name__ == "__main__":
    main()
