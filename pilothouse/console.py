"""Shared terminal output of the ``pilothouse`` commands: one clear error line, a hint, a non-zero exit."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

# Piped output (CI logs, `| less`) gets a readable width instead of rich's 80-column default.
err = Console(stderr=True, soft_wrap=True)  # error lines stay whole: grep-able, copy-able
out = Console(width=None if sys.stdout.isatty() else 160)


def fail(message: str, hint: str | None = None, code: int = 2) -> typer.Exit:
    """Print the error (and a hint) and return the Exit to raise: ``raise fail(...)``."""
    err.print(f"[bold red]error:[/] {message}")
    if hint:
        err.print(f"[dim]hint:[/] {hint}")
    return typer.Exit(code)
