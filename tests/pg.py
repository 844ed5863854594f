"""A throwaway PostgreSQL server for the tests of the PostgreSQL code paths (ledger, audit, idempotency).

``tests/conftest.py`` turns this into the session-scoped ``postgres_url`` fixture:

1. ``PILOTHOUSE_TEST_POSTGRES_URL`` set: that server is used as is (it must let the tests create and
   drop databases); nothing is started.
2. Else, when the PostgreSQL server binaries are installed (``pg_config --bindir``, Debian's
   ``/usr/lib/postgresql/<version>/bin``, or ``initdb`` on PATH): ``initdb`` a cluster into a fresh
   temporary directory, start ``postgres`` on a free 127.0.0.1 port (socket in that directory,
   ``fsync=off``: nothing here must survive a crash), create a database, hand out its URL, and stop the
   server (``pg_ctl stop -m fast``) and delete the directory at the end of the session.
   PostgreSQL refuses to run as root: when the tests run as root (CI on a fresh Debian machine) the
   directory is chowned to the ``postgres`` system user that Debian's ``postgresql`` package creates,
   and ``initdb`` / ``postgres`` / ``pg_ctl`` run as that user (``subprocess``'s ``user=``/``group=``).
3. Else the PostgreSQL variants skip with :data:`NOT_INSTALLED` (``make test`` installs the server on
   Debian when run as root).
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from glob import glob
from pathlib import Path
from typing import Any, TypeVar

import pytest
import sqlalchemy as sa

ENV_URL = "PILOTHOUSE_TEST_POSTGRES_URL"
NOT_INSTALLED = ("PostgreSQL server not installed: apt-get install postgresql "
                 "(make test does this on Debian when run as root)")
RUN_AS = "postgres"  # the system user Debian's postgresql package creates
DATABASE = "pilothouse_test"
START_TIMEOUT_S = 60.0


class Unavailable(Exception):
    """No server can be started here; the message is the skip reason."""


def server_bindir() -> Path | None:
    """The directory holding ``initdb``, ``postgres`` and ``pg_ctl``, or None when not installed."""
    candidates: list[Path] = []
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=10, check=True)
        candidates.append(Path(out.stdout.strip()))

    def version(path: str) -> tuple[int, ...]:
        name = Path(path).parent.parent.name
        return tuple(int(p) for p in name.split(".") if p.isdigit())

    candidates += [Path(p).parent for p in sorted(glob("/usr/lib/postgresql/*/bin/initdb"), key=version,
                                                     reverse=True)]
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)
    for bindir in candidates:
        if all((bindir / tool).is_file() for tool in ("initdb", "postgres", "pg_ctl")):
            return bindir
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    """One ``postgres`` process on a throwaway cluster; ``url`` is the SQLAlchemy URL of its database."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.as_user: dict[str, Any] = {}
        if os.geteuid() == 0:
            try:
                account = pwd.getpwnam(RUN_AS)
            except KeyError:
                raise Unavailable(f"running as root and there is no {RUN_AS!r} user to run the PostgreSQL "
                                  f"server as (it refuses root): set {ENV_URL}") from None
            self.as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        self.root = Path(tempfile.mkdtemp(prefix="pilothouse-pg-"))
        self.data, self.socket_dir, self.log = self.root / "data", self.root / "sock", self.root / "postgres.log"
        self.socket_dir.mkdir()
        if self.as_user:
            for path in (self.root, self.socket_dir):
                os.chown(path, self.as_user["user"], self.as_user["group"])
        self.process: subprocess.Popen[bytes] | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"postgresql+psycopg://{RUN_AS}@127.0.0.1:{self.port}/{DATABASE}"

    def _run(self, *args: str) -> None:
        done = subprocess.run([str(self.bindir / args[0]), *args[1:]], cwd=self.root, capture_output=True,
                              text=True, timeout=120, check=False, **self.as_user)
        if done.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({done.returncode}):\n{done.stdout}{done.stderr}")

    def start(self) -> None:
        self._run("initdb", "-D", str(self.data), "-U", RUN_AS, "-A", "trust", "-E", "UTF8", "--no-locale",
                  "--no-sync")
        self.port = free_port()
        self._launch()
        admin = sa.make_url(self.url).set(database="postgres")
        engine = sa.create_engine(admin, isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(f'CREATE DATABASE "{DATABASE}"')
        finally:
            engine.dispose()

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server as an administrator would (``pg_ctl stop -m fast``: every session is ended and its
        transaction rolled back), stay down ``down_s``, and start it again on the same data and port."""
        assert self.process is not None
        self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30")
        self.process.wait(timeout=30)
        time.sleep(down_s)
        self._launch()

    def _launch(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.bindir / "postgres"), "-D", str(self.data), "-k", str(self.socket_dir),
                 "-p", str(self.port), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True, **self.as_user)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import psycopg

        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"postgres exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                psycopg.connect(host="127.0.0.1", port=self.port, user=RUN_AS, dbname="postgres",
                                connect_timeout=2).close()
                return
            except psycopg.OperationalError as error:
                if time.monotonic() > deadline:
                    tail = self.log_tail()
                    raise RuntimeError(f"postgres not ready after {START_TIMEOUT_S:.0f}s:\n{tail}") from error
                time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self) -> None:
        try:
            if self.process is not None and self.process.poll() is None:
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self._run("pg_ctl", "stop", "-D", str(self.data), "-m", "fast", "-w", "-t", "30")
                if self.process.poll() is None:
                    self.process.kill()
                self.process.wait(timeout=30)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def postgres_server() -> Iterator[str]:
    """The URL of a PostgreSQL database where tests may create and drop databases (see the module doc).
    Raises :class:`Unavailable` (a skip reason) when there is none; a server that is installed but fails
    to start raises ``RuntimeError`` (an error, not a skip: CI must not go green without it)."""
    if url := os.environ.get(ENV_URL):
        yield url
        return
    with temp_postgres() as server:
        yield server.url


_T = TypeVar("_T")


@contextmanager
def or_skip(server: contextlib.AbstractContextManager[_T]) -> Iterator[_T]:
    """``server`` (``postgres_server()`` or ``temp_postgres()``) entered for a fixture, or the test skipped with
    the reason when there is no PostgreSQL to run."""
    with contextlib.ExitStack() as stack:
        try:
            entered = stack.enter_context(server)
        except Unavailable as reason:
            pytest.skip(str(reason))
        yield entered


@contextmanager
def temp_postgres() -> Iterator[TempPostgres]:
    """A PostgreSQL server of the caller's own, from the installed binaries (a drill that restarts it), stopped
    and removed afterwards. Raises :class:`Unavailable` when there are no binaries or they cannot run here."""
    bindir = server_bindir()
    if bindir is None:
        raise Unavailable(NOT_INSTALLED)
    server = TempPostgres(bindir)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@contextmanager
def throwaway_postgres_database(server_url: str, prefix: str = "test") -> Iterator[str]:
    """A fresh, empty database on the server, dropped afterwards; yields its URL."""
    admin = sa.create_engine(server_url, isolation_level="AUTOCOMMIT")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield sa.make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()


def drop_connections(url: str) -> int:
    """Close every other connection to ``url``'s database from the server side, as a restart, an idle timeout or
    a pooler's reset does; how many it closed."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(sa.text(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()")).scalar_one())
    finally:
        engine.dispose()
