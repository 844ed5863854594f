"""Milvus Lite in its own process, on a fixed local port, so a test can SIGKILL it and start it again,
or pause it (SIGSTOP: the socket stays open, nothing answers, as with a hung server or a partition).

In-process Milvus Lite (a ``.db`` path as the URI) is a gRPC thread of the test process itself:
stopping it there is a clean shutdown, not a crash, and it cannot be killed without killing the
test. ``python -m milvus_lite server`` runs the same engine as a standalone gRPC server on the data
directory; every client reaches it as ``http://127.0.0.1:PORT``, as it would a Milvus Service. The
data directory's advisory ``flock`` dies with the process, so a restart on the same directory and
port finds the flushed collections again (only flushed rows: ingestion flushes at its end).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from tests.pg import free_port

READY_TIMEOUT_S = 60.0
READY_LINE = b"MilvusLite gRPC server listening on"  # printed by run_server once the server has started


class MilvusLiteServer:
    """One ``milvus_lite server`` process at a time on ``data_dir``; ``uri`` stays the same across restarts."""

    def __init__(self, data_dir: Path, port: int | None = None) -> None:
        self.data_dir = data_dir
        self.port = port or free_port()
        self.log = data_dir.parent / f"{data_dir.name}.server.log"
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server; return once it says it is listening (it opens the data first, then serves)."""
        assert self._process is None, "already running"
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self._process = subprocess.Popen(
                [sys.executable, "-m", "milvus_lite", "server", "--data-dir", str(self.data_dir),
                 "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # the ready line must not sit in a buffer
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"milvus_lite server exited with {self._process.returncode}; see {self.log}")
            with self.log.open("rb") as log:
                log.seek(offset)
                if READY_LINE in log.read():
                    return
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"milvus_lite server not listening on {self.port} in {READY_TIMEOUT_S:.0f} s; "
                           f"see {self.log}")

    def kill(self) -> None:
        """SIGKILL the server's process group (a crash: no shutdown, no final flush) and reap it."""
        if self._process is None:
            return
        if self._process.poll() is None:
            os.killpg(self._process.pid, signal.SIGKILL)  # a stopped process dies of SIGKILL too
        self._process.wait()
        self._process = None

    def pause(self) -> None:
        """SIGSTOP: connections stay open and calls are accepted, but no answer comes until :meth:`resume`."""
        assert self._process is not None, "not running"
        os.killpg(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None, "not running"
        os.killpg(self._process.pid, signal.SIGCONT)

    def __enter__(self) -> MilvusLiteServer:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.kill()
