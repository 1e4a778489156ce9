"""Start the embedded MongoDB-compatible server (secantusdb) once per host.

secantusdb is GPL-2.0 and beta, so it runs as its own process (its CLI) and we
talk to it only over the wire, like any MongoDB. A file lock plus a state file
in DATA_DIR make every gunicorn worker (and every other server process using
the same DATA_DIR) share one instance: the first caller starts it, later
callers read its port and reuse it. Only the process that started it stops it.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STATE_FILE = "embedded-mongo.json"
LOCK_FILE = "embedded-mongo.lock"


@dataclass
class EmbeddedMongo:
    uri: str
    pid: int
    port: int
    owner: bool  # True when this process started it (and so stops it)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _answers(port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def _locked(data_dir: Path) -> Iterator[None]:
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def uri_for(port: int) -> str:
    return f"mongodb://127.0.0.1:{port}/?directConnection=true"


def _read_state(data_dir: Path) -> dict | None:
    try:
        return json.loads((data_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None


def ensure_embedded_mongo(data_dir: Path, port: int = 0, *, startup_timeout: float = 30.0) -> EmbeddedMongo:
    """Return the host's embedded server, starting it if nobody has."""
    data_dir = Path(data_dir).resolve()
    with _locked(data_dir):
        state = _read_state(data_dir)
        if state and _alive(state["pid"]) and _answers(state["port"]):
            return EmbeddedMongo(uri_for(state["port"]), state["pid"], state["port"], owner=False)
        chosen = port or _free_port()
        storage = data_dir / "db"
        storage.mkdir(parents=True, exist_ok=True)
        logfile = open(data_dir / "embedded-mongo.log", "ab")  # noqa: SIM115 - handed to the child
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                str(chosen),
                "--storage-path",
                str(storage),
                "--log-level",
                "WARNING",
            ],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a Ctrl-C in the dev server's terminal must not kill it first
        )
        logfile.close()
        deadline = time.monotonic() + startup_timeout
        while not _answers(chosen):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"embedded MongoDB (secantusdb) exited with code {proc.returncode}; "
                    f"see {data_dir / 'embedded-mongo.log'}"
                )
            if time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(
                    f"embedded MongoDB did not answer on port {chosen} within {startup_timeout}s"
                )
            time.sleep(0.05)
        (data_dir / STATE_FILE).write_text(
            json.dumps({"pid": proc.pid, "port": chosen, "owner_pid": os.getpid()})
        )
        log.info("embedded MongoDB started on 127.0.0.1:%s (pid %s, data %s)", chosen, proc.pid, storage)
        return EmbeddedMongo(uri_for(chosen), proc.pid, chosen, owner=True)


def stop_embedded_mongo(data_dir: Path, timeout: float = 10.0) -> bool:
    """Stop the host's embedded server (SIGTERM, then SIGKILL). Returns True if one was stopped."""
    data_dir = Path(data_dir).resolve()
    with _locked(data_dir):
        state = _read_state(data_dir)
        if not state:
            return False
        pid = state["pid"]
        stopped = False
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                _reap(pid)
                time.sleep(0.05)
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
            _reap(pid)
            stopped = True
        (data_dir / STATE_FILE).unlink(missing_ok=True)
        return stopped


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def stop_at_exit(data_dir: Path, server: EmbeddedMongo) -> None:
    """Stop the server at exit in the process that started it, after that process's clients are closed
    (apps/core/lifecycle.py orders the two; plain atexit order would stop the server first)."""
    if server.owner:
        from .lifecycle import stop_db_at_exit

        stop_db_at_exit(lambda: stop_embedded_mongo(data_dir))
