"""``--store-url`` for the commands that read the gateway's store (audit, review).

Parsed once, opened as it is (a missing SQLite file is an error here, never a new empty store that
would answer "nothing found"), and any database error while reading it is one line, not a traceback.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer

from .console import fail

if TYPE_CHECKING:
    import sqlalchemy as sa

T = TypeVar("T")
DEFAULT_STORE_URL = "sqlite:///.pilothouse/pilothouse.db"
StoreUrl = Annotated[
    str, typer.Option(envvar="PILOTHOUSE_STORE_URL",
                      help="SQLAlchemy URL of the gateway's store (audit trail, ledger, runs, review queue).")
]


def parse_store_url(store_url: str) -> sa.URL:
    from sqlalchemy import exc, make_url

    try:
        return make_url(store_url)
    except exc.ArgumentError:
        raise fail(f"--store-url {store_url!r} is not a database URL", f"e.g. {DEFAULT_STORE_URL}") from None


def open_existing(store_url: str, opener: Callable[[str], T], what: str) -> T:
    """``opener(store_url)`` (which must not create the store), after checking a SQLite file exists."""
    url = parse_store_url(store_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise fail(f"no {what} at {url.database}", "pass --store-url (or PILOTHOUSE_STORE_URL) of the gateway")
    try:
        return opener(store_url)
    except (ValueError, ImportError) as exc:
        raise fail(str(exc)) from None


def read(action: Callable[[], T], store_url: str, what: str, hint: str) -> T:
    """Run ``action``; a database error is ``cannot read the <what> at <url>: <first line>`` and the hint."""
    import sqlalchemy as sa

    try:
        return action()
    except sa.exc.SQLAlchemyError as exc:
        detail = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise fail(f"cannot read the {what} at {store_url}: {detail}", hint) from None
