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


def hide_flag_types() -> None:
    """Newer typer releases (0.2x) print every option's type in --help, a flag's too: `--dry-run <bool>` reads as
    if it took a value (`--dry-run true` is a usage error). A flag's type column is left empty; other options
    keep theirs (`<path>`, `<int range>`). Older typers, without `display_type_rich`, print none for flags."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "hides_flags", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag else shown(self, ctx)

    display_type_rich.hides_flags = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]
