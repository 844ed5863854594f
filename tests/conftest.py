"""Fixtures shared by every suite."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import pytest

from tests.pg import Unavailable, postgres_server


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A PostgreSQL server where tests may create databases: ``PILOTHOUSE_TEST_POSTGRES_URL``, or one
    started for this session from the installed server binaries (tests/pg.py); skips when neither."""
    with ExitStack() as stack:
        try:
            url = stack.enter_context(postgres_server())
        except Unavailable as reason:
            pytest.skip(str(reason))
        yield url
