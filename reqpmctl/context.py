"""What every reqpmctl command shares: the context (socket, --json), the error mapping."""

from __future__ import annotations

import importlib
import sys
from typing import Any, NoReturn

import click

from reqpmctl import output
from reqpmctl.client import Client, ClientError


class Ctx:
    def __init__(self, socket_path: str, as_json: bool) -> None:
        self.socket_path = socket_path
        self.json = as_json
        self.colour = output.use_colour()

    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        with Client(self.socket_path) as c:
            return c.call(op, args)

    def client(self) -> Client:
        return Client(self.socket_path)

    def emit(self, obj: Any, human: str) -> None:
        click.echo(output.dump_json(obj) if self.json else human)


def fail(exc: ClientError) -> NoReturn:
    click.echo(f"reqpmctl: {exc.message}", err=True)
    sys.exit(exc.exit_code)


class Group(click.Group):
    """Maps daemon errors to one stderr line and the documented exit code. Commands in
    ``lazy`` ("name" -> "module:attribute") are imported only when they run or are
    listed, so ``reqpmctl submit`` does not pay for ``top``'s rich or ``projects``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy: dict[str, str] = {}

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, _, attr = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attr), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            fail(exc)


pass_ctx = click.make_pass_decorator(Ctx)
