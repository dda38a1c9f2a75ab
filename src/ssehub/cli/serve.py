"""`ssehub serve`: the hub and gateway on uvicorn. Options come from `Settings` fields."""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable
from typing import Any

import click

from ssehub.settings import Settings, setting_fields

ENV_PREFIX = "SSEHUB_"


def _click_type(name: str) -> Any:
    """The type of setting `name`, without its `| None`."""
    # `from __future__ import annotations` leaves the annotations as strings.
    hint = typing.get_type_hints(Settings)[name]
    if isinstance(hint, types.UnionType):
        (hint,) = (arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def _with_settings_options(command: Callable[..., Any]) -> Callable[..., Any]:
    for f in reversed(setting_fields()):
        flag = "--" + f.name.replace("_", "-")
        command = click.option(
            flag,
            f.name,
            type=_click_type(f.name),
            default=f.default,
            show_default=f.default is not None,
            envvar=ENV_PREFIX + f.name.upper(),
            show_envvar=True,
            help=f.metadata["help"],
        )(command)
    return command


def settings_to_env(settings: Settings) -> dict[str, str]:
    """The `SSEHUB_*` variables that reproduce `settings` in a worker process."""
    env = {}
    for f in setting_fields():
        value = getattr(settings, f.name)
        if value is not None:
            env[ENV_PREFIX + f.name.upper()] = str(value)
    return env


def settings_from_env(environ: typing.Mapping[str, str] | None = None) -> Settings:
    """Settings from `SSEHUB_*` variables, defaults for the rest."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in setting_fields():
        raw = environ.get(ENV_PREFIX + f.name.upper())
        if raw is not None and raw != "":
            values[f.name] = _click_type(f.name)(raw)
    return Settings(**values)


@click.command()
@_with_settings_options
def serve(**options: Any) -> None:
    """Serve channels, the OpenAI-compatible gateway and the web UI over HTTP.

    Every option can also be set with an SSEHUB_* environment variable.
    """
    settings = Settings(**options)
    if settings.workers < 1:
        raise click.BadParameter("must be at least 1", param_hint="--workers")
    if settings.workers > 1 and not settings.redis_url:
        raise click.UsageError(
            "--workers above 1 needs --redis-url: with the in-memory broker each worker "
            "would have its own channels, so subscribers would miss what others publish."
        )
    if settings.upstream_proxy:
        from ssehub.gateway.http1 import Proxy

        try:
            Proxy.parse(settings.upstream_proxy)
        except ValueError as error:
            raise click.BadParameter(str(error), param_hint="--upstream-proxy") from None
    import uvicorn

    from ssehub.server.app import create_app
    from ssehub.server.connection import http_protocol

    try:
        # Built here even for workers: a bad setting (a Redis URL that is not one, say)
        # is one clear line now, not a traceback from every worker.
        app = create_app(settings)
    except ValueError as error:
        raise click.UsageError(str(error)) from None

    common: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        "loop": "auto",
        # httptools, with subscriptions served outside ASGI (less memory per connection).
        "http": http_protocol(),
        "timeout_graceful_shutdown": settings.shutdown_grace,
        # Streams are long-lived: never let uvicorn cut them for being idle between events.
        "timeout_keep_alive": 5,
    }
    if settings.workers == 1:
        uvicorn.run(app, **common)
        return
    # Workers import the app by name, so settings travel as environment variables.
    os.environ.update(settings_to_env(settings))
    uvicorn.run(
        "ssehub.server.app:create_app_from_env",
        factory=True,
        workers=settings.workers,
        **common,
    )
