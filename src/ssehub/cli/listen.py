"""`ssehub listen`: curl for event streams, on the blocking client (`ssehub.client`)."""

from __future__ import annotations

import logging
import os
import sys
from typing import IO

import click
import httpx
import orjson
from rich.console import Console
from rich.highlighter import JSONHighlighter
from rich.text import Text

from ssehub.client import EventSource, SSEError, connect
from ssehub.protocol import ServerSentEvent

# Colours by event type, so errors and the hub's control events stand out.
_TYPE_STYLES = {
    "message": "bold cyan",
    "error": "bold red",
    "close": "bold yellow",
    "ssehub.gap": "bold yellow",
}


@click.command()
@click.argument("url")
@click.option(
    "-H",
    "--header",
    "headers",
    multiple=True,
    metavar="'NAME: VALUE'",
    help="Send this request header (repeatable).",
)
@click.option(
    "-X", "--request", "method", metavar="METHOD", help="HTTP method [default: GET, POST with -d]."
)
@click.option(
    "-d",
    "--data",
    metavar="BODY",
    help="Request body; @FILE reads a file, @- standard input. Content-Type defaults to "
    "application/json.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="One JSON object per event and line (keys event, data, id, retry); the default "
    "when standard output is not a terminal.",
)
@click.option("--last-event-id", metavar="ID", help="Resume after this event id.")
@click.option("--no-reconnect", is_flag=True, help="Exit when the connection ends or fails.")
@click.option(
    "--idle-timeout",
    type=float,
    metavar="SECONDS",
    default=60.0,
    show_default=True,
    help="Seconds without a byte (heartbeats count) before the connection is taken for "
    "dead; 0 waits forever.",
)
def listen(
    url: str,
    headers: tuple[str, ...],
    method: str | None,
    data: str | None,
    as_json: bool,
    last_event_id: str | None,
    no_reconnect: bool,
    idle_timeout: float,
) -> None:
    """Print the events of the event stream at URL, reconnecting and resuming as needed.

    \b
    ssehub listen http://localhost:8000/channels/news
    ssehub listen URL -X POST -H 'Authorization: Bearer KEY' -d '{"stream": true}'
    ssehub listen URL --json | jq -r .data
    """
    request_headers = [_parse_header(h) for h in headers]
    body = None if data is None else _read_body(data)
    if body is not None and not any(name.lower() == "content-type" for name, _ in request_headers):
        request_headers.append(("Content-Type", "application/json"))
    json_lines = as_json or not sys.stdout.isatty()
    _show_connection_notices(verbose=sys.stderr.isatty())
    try:
        source = connect(
            url,
            method=method or ("POST" if body is not None else "GET"),
            headers=request_headers,
            content=body,
            last_event_id=last_event_id,
            reconnect=not no_reconnect,
            idle_timeout=idle_timeout or None,
        )
        with source:
            if json_lines:
                _print_json_lines(source, sys.stdout.buffer)
            else:
                _print_readable(source, Console(highlight=False, soft_wrap=True))
    except KeyboardInterrupt:
        # Ctrl-C is how a listener usually ends: no traceback, the shell's code for SIGINT.
        sys.exit(130)
    except BrokenPipeError:
        # `ssehub listen URL | head -1`: the reader left. Quiet, like curl; stdout is pointed
        # at devnull so that flushing it at exit does not complain again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    # ValueError: EventTooLarge, or a last event id with a line break.
    except (SSEError, ValueError, httpx.HTTPError, httpx.InvalidURL) as exc:
        raise click.ClickException(_one_line(exc)) from None


def _print_json_lines(source: EventSource, out: IO[bytes]) -> None:
    for event in source:
        line = {"event": event.event, "data": event.data, "id": event.id, "retry": source.retry}
        out.write(orjson.dumps(line) + b"\n")
        out.flush()  # each event as it comes, also into a pipe


def _print_readable(source: EventSource, console: Console) -> None:
    for event in source:
        console.print(render(event))


def render(event: ServerSentEvent) -> Text:
    """An event for a terminal: its type and id, then its data (JSON highlighted)."""
    text = Text()
    text.append(event.event, style=_TYPE_STYLES.get(event.event, "bold green"))
    if event.id:
        text.append(f" #{event.id}", style="magenta")
    data = Text(event.data)
    if event.data[:1] in ("{", "["):
        try:
            orjson.loads(event.data)
        except orjson.JSONDecodeError:
            pass
        else:
            JSONHighlighter().highlight(data)
    if "\n" in event.data:
        data = Text("\n").join(Text("  ") + line for line in data.split("\n", allow_blank=True))
        text.append("\n")
    else:
        text.append("  ")
    text.append(data)
    return text


def _parse_header(header: str) -> tuple[str, str]:
    name, colon, value = header.partition(":")
    if not colon or not name.strip():
        raise click.ClickException(f"bad header {header!r}: expected 'Name: value'")
    return name.strip(), value.strip()


def _read_body(data: str) -> bytes:
    if data == "@-":
        return sys.stdin.buffer.read()
    if data.startswith("@"):
        try:
            with open(data[1:], "rb") as f:
                return f.read()
        except OSError as exc:
            raise click.ClickException(f"cannot read {data[1:]}: {exc.strerror}") from None
    return data.encode()


def _one_line(exc: BaseException) -> str:
    notes: list[str] = getattr(exc, "__notes__", [])
    message = " ".join((str(exc) or type(exc).__name__).split())
    return f"{message} ({'; '.join(notes)})" if notes else message


class _StderrNotices(logging.Handler):
    """The client's connection notices (reconnecting, connected) as lines on stderr."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console

    def emit(self, record: logging.LogRecord) -> None:
        style = "yellow" if record.levelno >= logging.WARNING else "dim"
        self.console.print(Text(record.getMessage(), style=style))


def _show_connection_notices(verbose: bool) -> None:
    logger = logging.getLogger("ssehub.client")
    logger.setLevel(logging.INFO if verbose else logging.WARNING)
    for handler in [h for h in logger.handlers if isinstance(h, _StderrNotices)]:
        logger.removeHandler(handler)  # listen() run again in one process
    logger.addHandler(_StderrNotices(Console(stderr=True, highlight=False, soft_wrap=True)))
    logger.propagate = False
