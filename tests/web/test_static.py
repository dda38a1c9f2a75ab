"""Serving the UI: pages, modules, content types, revalidation, nothing outside static/."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette

from ssehub.web import PAGES, routes, static_file

from _support import serve_in_thread


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with serve_in_thread(Starlette(routes=routes())) as url:
        yield url


@pytest.mark.parametrize("path", list(PAGES))
def test_pages_are_html_with_a_policy(base: str, path: str) -> None:
    response = httpx.get(base + path)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert response.headers["x-content-type-options"] == "nosniff"
    assert '<script type="module"' in response.text


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("ssehub.js", "text/javascript; charset=utf-8"),
        ("chat.js", "text/javascript; charset=utf-8"),
        ("markdown.js", "text/javascript; charset=utf-8"),
        ("monitor.js", "text/javascript; charset=utf-8"),
        ("jobs.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
        ("favicon.svg", "image/svg+xml"),
    ],
)
def test_static_files_have_their_types(base: str, name: str, content_type: str) -> None:
    response = httpx.get(f"{base}/static/{name}")
    assert response.status_code == 200
    assert response.headers["content-type"] == content_type
    assert response.headers["etag"].startswith('"')
    file = static_file(name)
    assert file is not None
    assert response.content == file.body


def test_unchanged_file_revalidates_with_304(base: str) -> None:
    first = httpx.get(base + "/static/ssehub.js")
    etag = first.headers["etag"]
    again = httpx.get(base + "/static/ssehub.js", headers={"If-None-Match": f'"x", {etag}'})
    assert again.status_code == 304
    assert again.content == b""
    assert again.headers["etag"] == etag
    stale = httpx.get(base + "/static/ssehub.js", headers={"If-None-Match": '"stale"'})
    assert stale.status_code == 200
    assert stale.content == first.content


def test_head_has_headers_and_no_body(base: str) -> None:
    response = httpx.head(base + "/static/style.css")
    assert response.status_code == 200
    assert response.content == b""
    assert int(response.headers["content-length"]) == len(
        httpx.get(base + "/static/style.css").content
    )


@pytest.mark.parametrize(
    "path",
    [
        "/static/nope.js",
        "/static/../__init__.py",
        "/static/%2e%2e/__init__.py",
        "/static/..%2f__init__.py",
        "/static/",
        "/static/.hidden.js",
        "/static/index",
    ],
)
def test_anything_else_is_404(base: str, path: str) -> None:
    response = httpx.get(base + path)
    assert response.status_code == 404


def test_python_files_are_not_served() -> None:
    assert static_file("../__init__.py") is None
    assert static_file("__init__.py") is None


def test_every_reference_in_the_shipped_files_resolves() -> None:
    """Pages and modules only name files that ship (a typo would 404 in the browser)."""
    import re
    from importlib import resources

    folder = resources.files("ssehub.web").joinpath("static")
    names = sorted(node.name for node in folder.iterdir() if node.is_file())
    referenced: set[str] = set()
    for name in names:
        text = folder.joinpath(name).read_text()
        referenced |= set(re.findall(r"""["'(]/static/([\w./-]+)["')]""", text))
        referenced |= set(re.findall(r"""from\s+["']\./([\w./-]+)["']""", text))
        referenced |= set(re.findall(r"""import\(["']/static/([\w./-]+)["']\)""", text))
    assert {"ssehub.js", "chat.js", "markdown.js", "style.css"} <= referenced
    for name in referenced:
        assert static_file(name) is not None, name
