"""One child process per host, shared by every process that uses the same folder.

The embedded MongoDB (apps/core/embedded_mongo.py) and the llama.cpp server
(agent/llm/providers/local_server.py) both run this way: an exclusive lock file makes sure only one
caller starts the child, a state file ({pid, port, ...}, written atomically) lets every other process
find it, and liveness is checked three ways — the pid is alive, its `/proc/<pid>/cmdline` still names
the program (a reused pid does not count) and its port accepts connections. Stopping is SIGTERM, then
SIGKILL after a timeout.

Children get an explicit, minimal environment when asked (`child_env`): uvicorn inside llama_cpp.server
reads WEB_CONCURRENCY (gunicorn's worker count) and exits, its settings read PORT/HOST/MODEL and more from
the environment and let them win over its command line, and none of them needs our keys. Only what a
Python process needs to find itself, its libraries and its locale passes.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PASS_KEYS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "SYSTEMROOT",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)
PASS_PREFIXES = ("LC_", "GGML_")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of only the keys in PASS_KEYS / PASS_PREFIXES, plus `extra`."""
    env = {
        key: value for key, value in os.environ.items() if key in PASS_KEYS or key.startswith(PASS_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, timeout: float = 0.5) -> bool:
    """A TCP connect to 127.0.0.1:port (not an HTTP probe: a busy server may answer HTTP late)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def reap(pid: int) -> None:
    """Collect `pid` if it is our dead child (a zombie looks alive until reaped)."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


class HostProcess:
    """The host's one `marker` process, found through `<folder>/<name>.json` under `<folder>/<name>.lock`.

    `marker` is a byte string the child's command line contains (e.g. b"llama_cpp.server").
    """

    def __init__(self, folder: Path, *, name: str, marker: bytes, lock_name: str | None = None) -> None:
        self.folder = Path(folder)
        self.marker = marker
        self.state_path = self.folder / f"{name}.json"
        self.lock_path = self.folder / (lock_name or f"{name}.lock")

    @contextmanager
    def locked(self) -> Iterator[None]:
        """An exclusive fcntl lock shared by every process on the host that uses this folder."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def read_state(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return state if isinstance(state, dict) and "pid" in state else None

    def write_state(self, state: dict[str, Any]) -> None:
        """Replace the state file atomically: a reader never sees half of it."""
        tmp = self.state_path.with_name(f"{self.state_path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def clear_state(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def running(self, pid: int) -> bool:
        """True while `pid` is a live process of ours (a zombie or a reused pid does not count)."""
        reap(pid)
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return False
        return self.marker in cmdline

    def alive(self, state: dict[str, Any] | None, probe_timeout: float = 0.5) -> bool:
        """The state's process runs and its port accepts connections."""
        return (
            bool(state) and self.running(int(state["pid"])) and port_open(int(state["port"]), probe_timeout)
        )

    @staticmethod
    def spawn(
        args: list[str], log_path: Path, *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start the child in its own session (a Ctrl-C to our process group must not kill it first),
        its output appended to `log_path`."""
        with open(log_path, "ab") as log_fh:
            return subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=log_fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=env,
            )

    @staticmethod
    def wait_listening(
        proc: subprocess.Popen[bytes], port: int, timeout_s: float, probe_timeout: float = 0.5
    ) -> bool:
        """True once `port` accepts connections; False when the child exited or `timeout_s` passed."""
        deadline = time.monotonic() + timeout_s
        while not port_open(port, probe_timeout):
            if proc.poll() is not None or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop_pid(self, pid: int, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; reaps it when it is our child."""
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + timeout_s
        while self.running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.running(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + 5.0
            while self.running(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        reap(pid)
