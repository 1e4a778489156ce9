"""Start the embedded MongoDB-compatible server (secantusdb) once per host.

secantusdb is GPL-2.0 and beta, so it runs as its own process (its CLI) and we
talk to it only over the wire, like any MongoDB. A file lock plus a state file
in DATA_DIR make every gunicorn worker (and every other server process using
the same DATA_DIR) share one instance: the first caller starts it, later
callers read its port and reuse it. Only the process that started it stops it.

It runs with `--auth` (SCRAM-SHA-256): any local user on a shared lab PC can reach a localhost
port, so the study data needs a password. The password is generated once and kept in
DATA_DIR/embedded-mongo.secret (mode 0600); the user is provisioned the way secantus documents it
(start once without `--auth` on 127.0.0.1, `createUser`, stop, restart with `--auth`), only when the
secret file does not exist yet. The URIs handed out carry the credentials: never log them (use
`redact_uri`).
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol
from urllib.parse import quote_plus

from pymongo import MongoClient
from pymongo.errors import OperationFailure

from agent.host_process import HostProcess, free_port

from .lifecycle import stop_db_at_exit

log = logging.getLogger(__name__)

STATE_FILE = "embedded-mongo.json"
SECRET_FILE = "embedded-mongo.secret"
USER = "creativity"


@dataclass
class EmbeddedMongo:
    uri: str = field(repr=False)  # carries the password
    pid: int
    port: int
    owner: bool  # True when this process started it (and so stops it)


def _host(data_dir: Path) -> HostProcess:
    """The host's one secantus process: its state and lock files (embedded-mongo.json/.lock) in DATA_DIR."""
    return HostProcess(data_dir, name=STATE_FILE.removesuffix(".json"), marker=b"secantus")


# No retryable writes against the embedded server. secantusdb keeps every retryable write's reply for
# 30 minutes, up to 10,000, and scans (and past the cap sorts) that whole table on every retryable
# write: past 10,000 writes an update costs 10.8-12.8 ms instead of 0.65-0.78 ms, for as long as the
# server runs busy (`python bench/retry_writes.py`, 2026-12-02). What they would buy here is small: the
# table is in memory, so after the restart that breaks a connection a retried write runs again anyway,
# and a write that fails on a broken connection answers 503 (apps/core/resilience.py) or is retried by
# its caller (job events, leases, the SD pool). A MONGO_URI of a real MongoDB keeps pymongo's default.
OPTIONS = "directConnection=true&retryWrites=false"


def uri_for(port: int, password: str | None = None) -> str:
    """The server's URI; with `password`, one that authenticates as the provisioned user."""
    if password is None:
        return f"mongodb://127.0.0.1:{port}/?{OPTIONS}"
    return (
        f"mongodb://{USER}:{quote_plus(password)}@127.0.0.1:{port}/"
        f"?{OPTIONS}&authSource=admin&authMechanism=SCRAM-SHA-256"
    )


def redact_uri(uri: str) -> str:
    """`uri` with any password replaced, for logs."""
    return re.sub(r"(mongodb(?:\+srv)?://[^:/@]+):[^@]*@", r"\1:***@", uri)


def _read_secret(data_dir: Path) -> str | None:
    try:
        return (data_dir / SECRET_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def _write_secret(data_dir: Path, password: str) -> None:
    """Write the secret atomically, mode 0600 from the start (never readable by others, even briefly)."""
    tmp = data_dir / f".{SECRET_FILE}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(password + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, data_dir / SECRET_FILE)


def _spawn(data_dir: Path, port: int, *, auth: bool) -> subprocess.Popen[bytes]:
    storage = data_dir / "db"
    storage.mkdir(parents=True, exist_ok=True)
    args = [
        sys.executable,
        "-m",
        "secantus",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--storage-path",
        str(storage),
        "--log-level",
        "WARNING",
    ]
    if auth:
        args.append("--auth")
    # own session: a Ctrl-C in the dev server's terminal must not kill it first
    return HostProcess.spawn(args, data_dir / "embedded-mongo.log")


def _wait_answering(proc: subprocess.Popen[bytes], port: int, data_dir: Path, timeout: float) -> None:
    if HostProcess.wait_listening(proc, port, timeout):
        return
    if proc.poll() is not None:
        raise RuntimeError(
            f"embedded MongoDB (secantusdb) exited with code {proc.returncode}; "
            f"see {data_dir / 'embedded-mongo.log'}"
        )
    proc.kill()
    proc.wait()
    raise RuntimeError(f"embedded MongoDB did not answer on port {port} within {timeout}s")


def _terminate(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _provision(data_dir: Path, port: int, timeout: float) -> str:
    """Create the user on a server started without --auth, stop it; return the new password.

    Works on a new and on an existing (unauthenticated) data dir; a user left from a lost secret
    file gets the new password.
    """
    password = secrets.token_urlsafe(32)
    proc = _spawn(data_dir, port, auth=False)
    try:
        _wait_answering(proc, port, data_dir, timeout)
        client: MongoClient = MongoClient(uri_for(port), serverSelectionTimeoutMS=int(timeout * 1000))
        try:
            admin = client["admin"]
            try:
                admin.command("createUser", USER, pwd=password, roles=["root"])
            except OperationFailure as exc:
                if "already exists" not in str(exc):
                    raise
                admin.command("updateUser", USER, pwd=password)
        finally:
            client.close()
    finally:
        _terminate(proc)
    _write_secret(data_dir, password)
    log.info("embedded MongoDB: user %r provisioned, secret in %s", USER, data_dir / SECRET_FILE)
    return password


def ensure_embedded_mongo(data_dir: Path, port: int = 0, *, startup_timeout: float = 30.0) -> EmbeddedMongo:
    """Return the host's embedded server (authenticating URI), starting it if nobody has."""
    data_dir = Path(data_dir).resolve()
    host = _host(data_dir)
    with host.locked():
        state = host.read_state()
        password = _read_secret(data_dir)
        if password and state and host.alive(state):
            return EmbeddedMongo(uri_for(state["port"], password), state["pid"], state["port"], owner=False)
        if state and host.running(state["pid"]):
            # running but not answering, or started before authentication existed: replace it
            host.stop_pid(state["pid"])
        chosen = port or free_port()
        if password is None:
            password = _provision(data_dir, chosen, startup_timeout)
        proc = _spawn(data_dir, chosen, auth=True)
        _wait_answering(proc, chosen, data_dir, startup_timeout)
        host.write_state({"pid": proc.pid, "port": chosen, "owner_pid": os.getpid()})
        log.info(
            "embedded MongoDB started on 127.0.0.1:%s with auth (pid %s, data %s)",
            chosen,
            proc.pid,
            data_dir / "db",
        )
        return EmbeddedMongo(uri_for(chosen, password), proc.pid, chosen, owner=True)


def stop_embedded_mongo(data_dir: Path, timeout: float = 10.0) -> bool:
    """Stop the host's embedded server (SIGTERM, then SIGKILL). Returns True if one was stopped."""
    host = _host(Path(data_dir).resolve())
    with host.locked():
        state = host.read_state()
        if not state:
            return False
        stopped = False
        if host.running(state["pid"]):
            host.stop_pid(state["pid"], timeout)
            stopped = True
        host.clear_state()
        return stopped


def stop_at_exit(data_dir: Path, server: EmbeddedMongo) -> None:
    """Stop the server at exit in the process that started it, after that process's clients are closed
    (apps/core/lifecycle.py orders the two; plain atexit order would stop the server first)."""
    if server.owner:
        stop_db_at_exit(lambda: stop_embedded_mongo(data_dir))


class _Log(Protocol):
    def info(self, msg: str, *args: object) -> None: ...
    def warning(self, msg: str, *args: object) -> None: ...
    def error(self, msg: str, *args: object) -> None: ...


class Supervisor:
    """Restart the host's embedded server when it dies, on the same port (workers' URIs stay valid).

    Runs as a thread in gunicorn's master: without it a killed database stays down until someone
    restarts the whole server. Restarts back off (1 s doubling to `backoff_max_s`) so a server that
    dies at once is not restarted in a tight loop; the backoff resets after `stable_s` of health.
    """

    def __init__(
        self,
        data_dir: Path,
        port: int,
        *,
        interval_s: float = 0.5,
        backoff_max_s: float = 30.0,
        stable_s: float = 60.0,
        logger: _Log | None = None,
    ) -> None:
        self.data_dir = Path(data_dir).resolve()
        self.port = port
        self.interval_s = interval_s
        self.backoff_max_s = backoff_max_s
        self.stable_s = stable_s
        self.log: _Log = logger or log
        self.restarts = 0
        self.started_one = False  # this process started a server, so it stops it at exit
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="embedded-mongo-supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop watching (before the server is stopped on purpose, or it would be restarted)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def healthy(self) -> bool:
        host = _host(self.data_dir)
        return host.alive(host.read_state())

    def _run(self) -> None:
        delay = 1.0
        next_try = 0.0
        healthy_since = time.monotonic()
        misses = 0
        while not self._stop.wait(self.interval_s):
            if self.healthy():
                misses = 0
                if time.monotonic() - healthy_since > self.stable_s:
                    delay = 1.0
                continue
            misses += 1
            if misses < 2 or time.monotonic() < next_try:
                continue  # one missed probe may be a busy server; a restart in backoff waits its turn
            state = _host(self.data_dir).read_state() or {}
            self.log.warning(
                "embedded MongoDB on 127.0.0.1:%s (pid %s) is down; restarting", self.port, state.get("pid")
            )
            try:
                server = ensure_embedded_mongo(self.data_dir, self.port)
            except Exception as exc:  # noqa: BLE001 - any failure: log it, retry after the backoff
                self.log.error("embedded MongoDB restart failed: %s; next try in %.0f s", exc, delay)
            else:
                self.restarts += 1
                self.started_one = self.started_one or server.owner
                self.log.warning(
                    "embedded MongoDB restarted on 127.0.0.1:%s (pid %s; restart %d)",
                    server.port,
                    server.pid,
                    self.restarts,
                )
                healthy_since = time.monotonic()
                misses = 0
            next_try = time.monotonic() + delay
            delay = min(delay * 2, self.backoff_max_s)
