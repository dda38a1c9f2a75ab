"""An SSE stream read in a thread, for tests that drive several real servers at once."""

from __future__ import annotations

import threading
from typing import Any

import httpx

from ssehub.protocol import Decoder, ServerSentEvent

from _support import wait_for


class Listener:
    """GET `url` as an event stream in a thread; `events` fills as they come.

    The servers under test send heartbeats, so the thread notices `close()` soon.
    """

    def __init__(self, method: str, url: str, **kwargs: Any) -> None:
        self.events: list[ServerSentEvent] = []
        self.status: int | None = None
        self.ended = threading.Event()
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(method, url, kwargs), daemon=True)
        self._thread.start()

    def _run(self, method: str, url: str, kwargs: dict[str, Any]) -> None:
        decoder = Decoder()
        try:
            timeout = httpx.Timeout(10.0, read=30.0)
            with httpx.stream(method, url, timeout=timeout, **kwargs) as response:
                self.status = response.status_code
                for raw in response.iter_raw():
                    self.events.extend(decoder.feed(raw))
                    if self._stop.is_set():
                        return
        except BaseException as exc:  # the test asserts on it
            self.error = exc
        finally:
            self.ended.set()

    def data(self, event: str | None = "message") -> list[str]:
        return [e.data for e in self.events if event is None or e.event == event]

    def wait(self, count: int, event: str | None = "message", timeout: float = 30.0) -> None:
        wait_for(
            lambda: len(self.data(event)) >= count or self.ended.is_set(),
            timeout,
            0.02,
            f"{count} events",
        )
        assert len(self.data(event)) >= count, (self.events, self.error)

    def wait_ended(self, timeout: float = 30.0) -> None:
        wait_for(self.ended.is_set, timeout, 0.02, "the stream to end")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=15)
