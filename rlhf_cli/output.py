"""The CLI's consoles and its one way of reporting an error: a single `error:` line on stderr, no traceback
(unless --debug), and the error's exit code."""

from __future__ import annotations

from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

out = Console()
err = Console(stderr=True)


def print_error(message: object, where: str = "") -> None:
    """`error: <message>` (or `error (<where>): ...`) on stderr, the message printed as it is (brackets in it are
    not read as rich markup, nor highlighted)."""
    label = f"error ({where}):" if where else "error:"
    err.print(f"[bold red]{label}[/] {escape(str(message))}", highlight=False, soft_wrap=True)


def fail(exc: Exception, debug: bool) -> NoReturn:
    """Print the error and exit with its code (1 when it has none); with `debug`, raise it instead."""
    if debug:
        raise exc
    print_error(exc)
    raise typer.Exit(getattr(exc, "exit_code", 1)) from None
