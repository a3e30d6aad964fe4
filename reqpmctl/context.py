"""What every reqpmctl command shares: the context (socket, --json), the error mapping."""

from __future__ import annotations

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
    """Maps daemon errors to one stderr line and the documented exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except ClientError as exc:
            fail(exc)


pass_ctx = click.make_pass_decorator(Ctx)
