"""A FakeSD in a process of its own, driven from the benchmark over a pipe.

Why: K FakeSD servers in the benchmark's process share one interpreter lock. When several of them
end a generation at the same moment (ours runs one request's images in parallel, so they do), the
generation waiting inside each one takes its queue lock only once the interpreter is free of the
others' PNG encoding: the instances lose time to each other, which real WebUIs, each a process on
its own GPU, do not. In a process each, a fake only shares the CPU, like the real ones.

The benchmark reads what it needs of a fake (`requests`, `max_concurrent_seen`, `max_running`) as a
snapshot over the pipe; request bodies are cut down to the fields the measurements use.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
from multiprocessing.connection import Connection
from typing import Any

BODY_FIELDS = ("batch_size", "n_iter")
ENTRY_FIELDS = ("path", "start", "end", "status", "gen_start", "gen_end")


def _serve(conn: Connection, delay: float, name: str) -> None:
    """The child: one FakeSD, answering the parent's commands until "stop"."""
    from tests.fakes.fake_sd import FakeSD

    fake = FakeSD(delay=delay, name=name).start()
    conn.send(fake.url)
    try:
        while True:
            command = conn.recv()
            if command == "reset":
                fake.reset()
                conn.send(None)
            elif command == "state":
                entries = [
                    {
                        **{k: e.get(k) for k in ENTRY_FIELDS},
                        "json": {k: (e.get("json") or {}).get(k) for k in BODY_FIELDS},
                    }
                    for e in list(fake.requests)
                ]
                conn.send((entries, fake.max_concurrent_seen, fake.max_running))
            elif command == "stop":
                break
    finally:
        fake.stop()
        conn.send(None)


class FakeSDProcess:
    """The parts of FakeSD's interface the refinement scenario uses, for a FakeSD in a child process."""

    def __init__(self, delay: float, name: str) -> None:
        self._conn, child = mp.get_context("spawn").Pipe()
        self._proc = mp.get_context("spawn").Process(
            target=_serve, args=(child, delay, name), name=f"fake-sd-{name}", daemon=True
        )
        self._lock = threading.Lock()
        self.name = name
        self.url = ""

    def start(self) -> FakeSDProcess:
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError(f"fake SD {self.name} did not start")
        self.url = self._conn.recv()
        return self

    def _ask(self, command: str) -> Any:
        with self._lock:
            self._conn.send(command)
            return self._conn.recv()

    def reset(self) -> None:
        self._ask("reset")

    def _state(self) -> tuple[list[dict[str, Any]], int, int]:
        return self._ask("state")

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._state()[0]

    @property
    def max_concurrent_seen(self) -> int:
        return self._state()[1]

    @property
    def max_running(self) -> int:
        return self._state()[2]

    def stop(self) -> None:
        try:
            self._ask("stop")
        except (EOFError, OSError):
            pass  # already gone
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
