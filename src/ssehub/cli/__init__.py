"""The `ssehub` command. Each subcommand lives in a module of its own."""

from __future__ import annotations

import importlib

import click

# name -> "module:attribute"; imported only when that subcommand runs, so `ssehub listen`
# does not pay for importing the server.
_COMMANDS = {
    "serve": "ssehub.cli.serve:serve",
    "listen": "ssehub.cli.listen:listen",
    "chat": "ssehub.cli.chat:chat",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = _COMMANDS.get(cmd_name)
        if target is None:
            return None
        module_name, attribute = target.split(":")
        command = getattr(importlib.import_module(module_name), attribute)
        assert isinstance(command, click.Command)
        return command


@click.group(cls=_LazyGroup)
@click.version_option(package_name="ssehub")
def main() -> None:
    """Server-Sent Events: serve channels and model streams, listen to any event stream."""
