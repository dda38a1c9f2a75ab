"""The relay to an upstream through an HTTP proxy: CONNECT tunnels for https upstreams,
absolute-form requests for http ones, Basic proxy credentials, the environment's
variables (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY, NO_PROXY), and the errors a client or an
operator sees when the proxy is down, refuses, or is misconfigured."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from fake_upstream import TEXT_PIECES, FakeUpstream
from forward_proxy import ForwardProxy, forward_proxy
from sse import chunks, post_stream, text_of

from conftest import ServeGateway
from ssehub.gateway import http1
from ssehub.gateway.http1 import Proxies, Proxy, bypasses_proxy

from _support import free_port, self_signed_cert, serve_in_process, serve_in_thread

Upstream = tuple[str, FakeUpstream]
MESSAGES = [{"role": "user", "content": "hi"}]
STREAM = {"model": "fake-text", "messages": MESSAGES}
USER, PASSWORD = "ann", "p@ss:w/rd é"  # every character that must be percent-encoded
WRONG = "hunter2-wrong"


def with_credentials(proxy_url: str, user: str = USER, password: str = PASSWORD) -> str:
    credentials = f"{quote(user, safe='')}:{quote(password, safe='')}@"
    return proxy_url.replace("http://", "http://" + credentials)


def basic(user: str = USER, password: str = PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def https_upstream(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Upstream]:
    """The fake upstream over TLS as `https://localhost:PORT/v1`, with a self-signed
    certificate that gateways started from here trust (httpx's SSL_CERT_FILE)."""
    cert, key = self_signed_cert(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    fake = FakeUpstream()
    with serve_in_thread(fake, ssl_certfile=str(cert), ssl_keyfile=str(key)) as url:
        yield url.replace("http://127.0.0.1", "https://localhost") + "/v1", fake


@pytest.fixture
def proxy() -> Iterator[ForwardProxy]:
    with forward_proxy() as running:
        yield running


@pytest.fixture
def strict_proxy() -> Iterator[ForwardProxy]:
    """A proxy that answers 407 without `ann`'s credentials."""
    with forward_proxy((USER, PASSWORD)) as running:
        yield running


def assert_streams(url: str) -> None:
    # (trust_env=False: the proxy variables a test sets are for the gateway, not for us.)
    response, events = post_stream(url, STREAM, trust_env=False)
    assert response.status_code == 200, response.text
    assert text_of(chunks(events)) == "".join(TEXT_PIECES)
    assert events[-1].data == "[DONE]"


def error_of(url: str) -> tuple[int, str]:
    """The status and error message of a streamed completion that failed before its start."""
    response, events = post_stream(url, STREAM)
    assert not events
    return response.status_code, response.json()["error"]["message"]


# -- through the gateway ---------------------------------------------------------------


def test_http_upstream_through_a_proxy_in_absolute_form_with_credentials(
    serve_gateway: ServeGateway, fake_upstream: Upstream, strict_proxy: ForwardProxy
) -> None:
    upstream_url, fake = fake_upstream
    with serve_gateway(
        upstream=upstream_url,
        upstream_api_key="up-key",
        upstream_proxy=with_credentials(strict_proxy.url),
    ) as url:
        assert_streams(url)
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert "fake-tools" in [m["id"] for m in models]  # listed through the proxy too
        answer = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=30)
        assert answer.json()["choices"][0]["message"]["content"] == "".join(TEXT_PIECES)
    origin = upstream_url.removesuffix("/v1")
    assert [(s.method, s.target) for s in strict_proxy.seen] == [
        ("POST", origin + "/v1/chat/completions"),
        ("GET", origin + "/v1/models"),
        ("POST", origin + "/v1/chat/completions"),
    ]
    for seen in strict_proxy.seen:
        assert seen.headers["proxy-authorization"] == basic()
        assert seen.headers["host"] == origin.removeprefix("http://")
    # The upstream got the request and the gateway's key, not the proxy's credentials.
    first = fake.requests_for("fake-text")[0]
    assert first.headers["authorization"] == "Bearer up-key"
    assert "proxy-authorization" not in first.headers


def test_https_upstream_through_a_connect_tunnel(
    serve_gateway: ServeGateway, https_upstream: Upstream, strict_proxy: ForwardProxy
) -> None:
    upstream_url, fake = https_upstream
    authority = upstream_url.removeprefix("https://").removesuffix("/v1")
    with serve_gateway(upstream=upstream_url, upstream_proxy=with_credentials(strict_proxy.url)):
        pass  # (a gateway that starts and stops without a request opens no tunnel)
    assert strict_proxy.seen == []
    with serve_gateway(
        upstream=upstream_url, upstream_proxy=with_credentials(strict_proxy.url)
    ) as url:
        assert_streams(url)
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        assert "fake-tools" in [m["id"] for m in models]
    assert strict_proxy.seen, "the proxy saw nothing"
    for seen in strict_proxy.seen:  # tunnels only: the requests themselves are encrypted
        assert (seen.method, seen.target) == ("CONNECT", authority)
        assert seen.headers["host"] == authority
        assert seen.headers["proxy-authorization"] == basic()
    assert len(fake.requests_for("fake-text")) == 1


def test_the_environment_names_the_proxy_per_scheme_and_no_proxy_excludes_hosts(
    serve_gateway: ServeGateway,
    fake_upstream: Upstream,
    proxy: ForwardProxy,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    upstream_url, fake = fake_upstream
    # For an http upstream: HTTP_PROXY, not HTTPS_PROXY (a dead one here) nor ALL_PROXY.
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with serve_gateway(upstream=upstream_url) as url:
        assert_streams(url)
    assert [s.target for s in proxy.seen] == [upstream_url + "/chat/completions"]

    monkeypatch.setenv("NO_PROXY", "example.com, 127.0.0.1")
    with serve_gateway(upstream=upstream_url) as url:
        assert_streams(url)
    assert len(proxy.seen) == 1  # straight to the upstream
    assert len(fake.requests_for("fake-text")) == 2

    # NO_PROXY is for the environment's proxies: an explicit one is used regardless.
    with serve_gateway(upstream=upstream_url, upstream_proxy=proxy.url) as url:
        assert_streams(url)
    assert len(proxy.seen) == 2


def test_ssehub_serve_takes_https_proxy_from_its_environment(
    https_upstream: Upstream, strict_proxy: ForwardProxy
) -> None:
    upstream_url, _ = https_upstream
    env = {"HTTPS_PROXY": with_credentials(strict_proxy.url), "NO_PROXY": "example.com"}
    with serve_in_process("--upstream", upstream_url, env=env) as (url, _):
        assert_streams(url)
    assert [s.method for s in strict_proxy.seen] == ["CONNECT"]
    assert strict_proxy.seen[0].headers["proxy-authorization"] == basic()


def test_a_proxy_that_refuses_connect_is_a_502_naming_the_proxy(
    serve_gateway: ServeGateway, https_upstream: Upstream, strict_proxy: ForwardProxy
) -> None:
    upstream_url, fake = https_upstream
    authority = upstream_url.removeprefix("https://").removesuffix("/v1")
    proxy_url = with_credentials(strict_proxy.url, password=WRONG)
    with serve_gateway(upstream=upstream_url, upstream_proxy=proxy_url) as url:
        status, message = error_of(url)
        models = httpx.get(url + "/v1/models", timeout=30).json()["data"]
        answer = httpx.post(url + "/v1/chat/completions", json=STREAM, timeout=30)
    assert (status, message) == (
        502,
        f"the proxy {strict_proxy.url} refused CONNECT to {authority}: "
        "407 Proxy Authentication Required",
    )
    assert [m["id"] for m in models] == ["ssehub-demo"]  # the upstream's could not be had
    assert answer.status_code == 502
    assert answer.json()["error"]["message"] == message
    assert WRONG not in message
    assert WRONG not in answer.text
    assert fake.seen == []


def test_a_proxy_that_answers_407_to_a_forwarded_request_is_a_502_naming_the_proxy(
    serve_gateway: ServeGateway, fake_upstream: Upstream, strict_proxy: ForwardProxy
) -> None:
    upstream_url, fake = fake_upstream
    origin = upstream_url.removesuffix("/v1")
    with serve_gateway(upstream=upstream_url, upstream_proxy=strict_proxy.url) as url:
        assert error_of(url) == (
            502,
            f"the proxy {strict_proxy.url} refused the request to {origin}: "
            "407 Proxy Authentication Required",
        )
    assert fake.seen == []


def test_a_proxy_that_is_down_is_a_502_naming_the_proxy(
    serve_gateway: ServeGateway, fake_upstream: Upstream
) -> None:
    upstream_url, _ = fake_upstream
    dead = f"http://127.0.0.1:{free_port()}"
    with serve_gateway(upstream=upstream_url, upstream_proxy=with_credentials(dead)) as url:
        status, message = error_of(url)
    assert status == 502
    assert message.startswith(f"cannot connect to the proxy {dead} (for 127.0.0.1:")
    assert PASSWORD not in message
    assert quote(PASSWORD, safe="") not in message


# -- ssehub serve refuses a proxy it cannot use ----------------------------------------


def serve_fails(*args: str, env: dict[str, str] | None = None) -> str:
    """Run `ssehub serve ARGS`, which must exit at once with a usage error; its stderr."""
    cmd = [sys.executable, "-m", "ssehub", "serve", "--port", str(free_port()), *args]
    done = subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "Error:" in done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


@pytest.mark.parametrize(
    ("proxy_url", "says"),
    [
        ("socks5://ann:hunter2@127.0.0.1:1080", "only http:// proxies are supported"),
        ("https://ann:hunter2@proxy.example:443", "not https://"),
        ("http://ann:hunter2@proxy.example:port", "not a proxy URL"),
        ("http://ann:hunter2@proxy.example:3128/some/path", "not a proxy URL"),
        ("http://ann:hunt/er2@proxy.example:3128", "not a proxy URL"),
    ],
)
def test_serve_refuses_a_bad_upstream_proxy(proxy_url: str, says: str) -> None:
    stderr = serve_fails("--upstream", "https://api.example/v1", "--upstream-proxy", proxy_url)
    assert "--upstream-proxy" in stderr
    assert says in stderr
    assert "hunt" not in stderr  # (nor any piece of the password)


def test_serve_refuses_a_proxy_variable_it_cannot_use_for_its_upstream() -> None:
    socks = "socks5://ann:hunter2@127.0.0.1:1080"
    stderr = serve_fails("--upstream", "https://api.example/v1", env={"HTTPS_PROXY": socks})
    assert "HTTPS_PROXY, the proxy for https://api.example:443" in stderr
    assert "only http:// proxies" in stderr
    assert "hunter2" not in stderr
    # Excluded by NO_PROXY, or for the other scheme: not used, so no matter.
    for env in ({"HTTPS_PROXY": socks, "NO_PROXY": ".example"}, {"HTTP_PROXY": socks}):
        with serve_in_process("--upstream", "https://api.example/v1", env=env) as (url, _):
            assert httpx.get(url + "/healthz", timeout=30).status_code == 200


# -- the client itself: pooling, tunnels per origin, timeouts --------------------------


@contextlib.asynccontextmanager
async def origin_server(
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering every request `ok`; yields its URL and the connection number of
    each request it got."""
    requests: list[int] = []
    writers: list[asyncio.StreamWriter] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        number = len(writers)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                await reader.readexactly(length)
                requests.append(number)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=ssl_context)
    port = server.sockets[0].getsockname()[1]
    try:
        async with server:
            yield f"{'https' if ssl_context else 'http'}://localhost:{port}", requests
    finally:
        await close_all(writers)


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    """Close the server side of connections and wait for it (sockets left to close in a
    later loop iteration may outlive the test's loop)."""
    for writer in writers:
        writer.transport.abort()
    for writer in writers:
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def fetch(pool: http1.Pool, url: str) -> bytes:
    response = await pool.request("POST", http1.Target.parse(url + "/v1/x"), {}, b"{}")
    body = await response.read(1000)
    await response.aclose()
    return body


@pytest.mark.anyio
async def test_proxied_connections_are_kept_alive_per_origin(
    tmp_path: Path, proxy: ForwardProxy
) -> None:
    cert, key = self_signed_cert(tmp_path)
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_context.load_cert_chain(cert, key)
    client_context = ssl.create_default_context(cafile=str(cert))
    pool = http1.Pool(ssl_context=client_context, proxies=Proxies(Proxy.parse(proxy.url)))
    try:
        async with (
            origin_server(server_context) as (a, a_requests),
            origin_server(server_context) as (b, b_requests),
            origin_server() as (plain, plain_requests),
        ):
            for url in (a, a, b, a, b, plain, plain):
                assert await fetch(pool, url) == b"ok"
    finally:
        await pool.aclose()
    # One tunnel per https origin, kept alive; http requests in absolute form.
    authority = {url: url.split("://")[1] for url in (a, b)}
    assert [(s.method, s.target) for s in proxy.seen] == [
        ("CONNECT", authority[a]),
        ("CONNECT", authority[b]),
        ("POST", plain + "/v1/x"),
        ("POST", plain + "/v1/x"),
    ]
    assert (a_requests, b_requests, plain_requests) == ([1, 1, 1], [1, 1], [1, 1])
    assert proxy.connections == 3  # a's tunnel, b's tunnel, one for the plain requests


@pytest.mark.anyio
async def test_connecting_through_a_silent_proxy_times_out_naming_it() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads the CONNECT, never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    proxy_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    pool = http1.Pool(http1.Timeouts(connect=0.3), proxies=Proxies(Proxy.parse(proxy_url)))
    try:
        async with server:
            with pytest.raises(http1.Timeout, match=f"through the proxy {proxy_url} timed out"):
                await fetch(pool, "https://api.example:8443")
    finally:
        await pool.aclose()
        await close_all(accepted)


# -- choosing the proxy ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypassed"),
    [
        ("*", "api.openai.com", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "api.example.com", 443, True),
        (".example.com", "example.com", 443, True),
        (".example.com", "api.example.com", 443, True),
        ("*.example.com", "api.example.com", 443, True),
        ("example.com", "notexample.com", 443, False),
        ("example.com", "example.com.evil", 443, False),
        (" other.org , EXAMPLE.com ", "Api.Example.Com.", 443, True),
        ("example.com:8443", "example.com", 8443, True),
        ("example.com:8443", "example.com", 443, False),
        ("127.0.0.1", "127.0.0.1", 8000, True),
        ("127.0.0.1", "localhost", 8000, False),  # matched as written: no DNS
        ("localhost", "127.0.0.1", 8000, False),
        ("localhost", "localhost", 8000, True),
        ("0.0.1", "10.0.0.1", 80, False),  # an address is no suffix
        ("10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("::1", "::1", 80, True),
        ("[::1]", "::1", 80, True),
        ("[::1]:8000", "::1", 8000, True),
        ("[::1]:8000", "::1", 80, False),
        ("fd00::/8", "fd12::5", 80, True),
        ("fd00::/8", "10.0.0.1", 80, False),
        ("", "example.com", 80, False),
        (",,", "example.com", 80, False),
    ],
)
def test_no_proxy_matching(no_proxy: str, host: str, port: int, bypassed: bool) -> None:
    assert bypasses_proxy(no_proxy, host, port) is bypassed


def test_the_environment_chooses_per_scheme_lower_case_first() -> None:
    env = {
        "HTTPS_PROXY": "http://upper-s:1",
        "https_proxy": "http://lower-s:2",
        "HTTP_PROXY": "plain-h:3",  # no scheme: http://, as curl and httpx read it
        "ALL_PROXY": "http://all:4",
    }

    def host(proxies: Proxies, scheme: str, target: str = "api.example") -> str | None:
        proxy = proxies.for_origin(scheme, target, 443)
        return None if proxy is None else f"{proxy.host}:{proxy.port}"

    assert host(Proxies.from_environ(env), "https") == "lower-s:2"
    assert host(Proxies.from_environ(env), "http") == "plain-h:3"
    assert host(Proxies.from_environ({"ALL_PROXY": "http://all:4"}), "https") == "all:4"
    assert host(Proxies.from_environ({"HTTPS_PROXY": "", "ALL_PROXY": "all"}), "https") == "all:80"
    assert host(Proxies.from_environ({}), "https") is None
    assert host(Proxies(), "https") is None
    excluded = {**env, "no_proxy": "api.example"}
    assert host(Proxies.from_environ(excluded), "https") is None
    assert host(Proxies.from_environ(excluded), "https", "other.example") == "lower-s:2"
    # An explicit proxy is used for every origin; NO_PROXY does not apply to it.
    explicit = Proxies(Proxy.parse("http://chosen:5"), excluded)
    assert host(explicit, "https") == "chosen:5"
    # The variables are read once: later changes do not move the choice.
    live = {"HTTPS_PROXY": "http://first:6"}
    proxies = Proxies.from_environ(live)
    live["HTTPS_PROXY"] = "http://second:7"
    assert host(proxies, "https") == "first:6"


def test_a_bad_variable_is_an_error_only_where_it_applies() -> None:
    proxies = Proxies.from_environ({"HTTPS_PROXY": "socks5://u:hunter2@h:1080"})
    assert proxies.for_origin("http", "api.example", 80) is None
    with pytest.raises(ValueError, match="HTTPS_PROXY, the proxy for https://") as raised:
        proxies.for_origin("https", "api.example", 443)
    assert "hunter2" not in str(raised.value)


def test_proxy_url_parsing_keeps_the_password_out_of_sight() -> None:
    proxy = Proxy.parse(f"http://{quote(USER)}:{quote(PASSWORD, safe='')}@Proxy.Corp:3128/")
    assert (proxy.host, proxy.port, proxy.url) == ("proxy.corp", 3128, "http://proxy.corp:3128")
    assert proxy.authorization == basic()
    assert "Basic" not in repr(proxy)
    assert Proxy.parse("http://u@h:1").authorization == basic("u", "")
    assert Proxy.parse("http://[::1]:3128").url == "http://[::1]:3128"
    assert Proxy.parse("proxy.corp").url == "http://proxy.corp:80"
    for bad in ("http://u:hunter2@:3128", "http://u:hunter2@h:0", "http://u:hunter2@h:99999"):
        with pytest.raises(ValueError, match="not a proxy URL") as raised:
            Proxy.parse(bad)
        assert "hunter2" not in str(raised.value)
