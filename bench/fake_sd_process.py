"""A FakeSD in a process of its own, driven from the benchmark over a pipe.

Why: K FakeSD servers in the benchmark's process share one interpreter lock, so one fake's PNG
encoding can delay the start of another's next generation; real WebUIs, each a process on its own
GPU, cannot do that to each other. In a process each, a fake only shares the CPU, like the real ones.
(Measured 2026-12-02, docs/pool.md: the per-instance hand-off was the same either way, 55 vs 57 ms
for ours at M=4, so this removes a possible artefact rather than a measured one.)

The benchmark reads what it needs of a fake (`requests`, `max_concurrent_seen`, `max_running`) over
the pipe, each a snapshot; request bodies are cut down to the fields the measurements use.
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
            elif command == "requests":
                entries = [
                    {
                        **{k: e.get(k) for k in ENTRY_FIELDS},
                        "json": {k: (e.get("json") or {}).get(k) for k in BODY_FIELDS},
                    }
                    for e in list(fake.requests)
                ]
                conn.send(entries)
            elif command == "counters":
                conn.send((fake.max_concurrent_seen, fake.max_running))
            elif command == "stop":
                break
    finally:
        fake.stop()
        conn.send(None)


class FakeSDProcess:
    """The parts of FakeSD's interface the refinement scenario uses, for a FakeSD in a child process."""

    def __init__(self, delay: float, name: str) -> None:
        spawn = mp.get_context("spawn")
        self._conn, child = spawn.Pipe()
        self._proc = spawn.Process(
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

    @property
    def requests(self) -> list[dict[str, Any]]:
        return self._ask("requests")

    @property
    def max_concurrent_seen(self) -> int:
        return self._ask("counters")[0]

    @property
    def max_running(self) -> int:
        return self._ask("counters")[1]

    def stop(self) -> None:
        try:
            self._ask("stop")
        except (EOFError, OSError):
            pass  # already gone
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
