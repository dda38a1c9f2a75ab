"""The web UI: a chat page, a channel monitor, a jobs page and the `ssehub.js` browser module.

Static files shipped inside the package (no build step): `routes()` serves them. Pages and
modules are revalidated on every load (`Cache-Control: no-cache` with a strong `ETag`, so
an unchanged file costs a 304): the file names carry no version, and an upgraded server
must never run next to a stale module cached by the browser.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

__all__ = ["PAGES", "StaticFile", "routes", "static_file"]

PAGES = {"/": "index.html", "/monitor": "monitor.html", "/jobs": "jobs.html"}

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".json": "application/json",
}

# The pages load only their own scripts and styles and talk only to this server: model
# output that somehow reached the DOM as markup still could not run a script.
_PAGE_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)


@dataclass(frozen=True, slots=True)
class StaticFile:
    """One file of the UI, read once: its bytes, content type and entity tag."""

    name: str
    body: bytes
    content_type: str
    etag: str


@cache
def _shipped() -> dict[str, StaticFile]:
    # Read once, the whole (small) folder: lookups are then by exact name only, so no
    # request path can reach outside it, and unknown names cost no cache entry.
    files: dict[str, StaticFile] = {}
    for node in resources.files(__name__).joinpath("static").iterdir():
        suffix = "." + node.name.rsplit(".", 1)[-1]
        content_type = _CONTENT_TYPES.get(suffix)
        if not node.is_file() or node.name.startswith(".") or content_type is None:
            continue
        body = node.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:32] + '"'
        files[node.name] = StaticFile(node.name, body, content_type, etag)
    return files


def static_file(name: str) -> StaticFile | None:
    """The shipped file `static/<name>`, or None for any other name."""
    return _shipped().get(name)


def _respond(request: Request, file: StaticFile) -> Response:
    headers = {
        "ETag": file.etag,
        "Cache-Control": "no-cache",
        "X-Content-Type-Options": "nosniff",
    }
    if file.content_type.startswith("text/html"):
        headers["Content-Security-Policy"] = _PAGE_POLICY
        headers["Referrer-Policy"] = "same-origin"
    # RFC 9110 13.1.2: If-None-Match holds a list of tags, or "*".
    match = request.headers.get("if-none-match", "")
    tags = {tag.strip().removeprefix("W/") for tag in match.split(",")}
    if match.strip() == "*" or file.etag in tags:
        return Response(status_code=304, headers=headers)
    body = b"" if request.method == "HEAD" else file.body
    response = Response(body, headers=headers, media_type=file.content_type)
    response.headers["Content-Length"] = str(len(file.body))
    return response


async def _page(request: Request) -> Response:
    file = static_file(PAGES[request.url.path])
    assert file is not None, "the package ships every page"
    return _respond(request, file)


async def _static(request: Request) -> Response:
    file = static_file(request.path_params["path"])
    if file is None:
        return PlainTextResponse("not found", status_code=404)
    return _respond(request, file)


def routes() -> list[BaseRoute]:
    """The UI's routes: the pages at `/`, `/monitor`, `/jobs` and files at `/static/...`."""
    pages: list[BaseRoute] = [
        Route(path, _page, methods=["GET", "HEAD"], name=f"web:{name.removesuffix('.html')}")
        for path, name in PAGES.items()
    ]
    return [
        *pages,
        Route("/static/{path:path}", _static, methods=["GET", "HEAD"], name="web:static"),
    ]
