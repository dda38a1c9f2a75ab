from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fake_upstream import FakeUpstream

from ssehub.gateway.http1 import PROXY_ENVIRONMENT
from ssehub.settings import Settings

from _support import serve_in_thread

ServeGateway = Callable[..., contextlib.AbstractContextManager[str]]


def _app(settings: Settings) -> Any:
    from ssehub.server.app import create_app

    return create_app(settings)


@pytest.fixture(autouse=True)
def _no_proxy_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's HTTPS_PROXY and co. must not send the tests' loopback upstreams
    through a proxy (gateways in subprocesses inherit the cleared environment too)."""
    for name in PROXY_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def fake_upstream() -> Iterator[tuple[str, FakeUpstream]]:
    fake = FakeUpstream()
    with serve_in_thread(fake) as url:
        yield url + "/v1", fake


@pytest.fixture
def serve_gateway() -> ServeGateway:
    """`with serve_gateway(**settings) as url:` a real gateway server on a free port."""

    @contextlib.contextmanager
    def serve(**changes: Any) -> Iterator[str]:
        settings = Settings(demo_delay=0.0, first_token_heartbeat=5.0).replace(**changes)
        with serve_in_thread(_app(settings)) as url:
            yield url

    return serve
