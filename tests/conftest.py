"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.pg import or_skip, postgres_server, throwaway_postgres_database


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server where tests may create databases: ``PILOTHOUSE_TEST_POSTGRES_URL``, or one
    started for this session from the installed server binaries (tests/pg.py); skips when neither."""
    with or_skip(postgres_server()) as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty store for the gateway's SQL stores (ledger, audit, idempotency, runs): a SQLite file,
    or a throwaway database on the PostgreSQL server of ``postgres_url`` (skipped with the reason when
    there is none)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/store.db"
    else:
        with throwaway_postgres_database(request.getfixturevalue("postgres_url"), "store_test") as url:
            yield url
