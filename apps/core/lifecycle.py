"""Process exit in one explicit order: close every open app's clients, then stop the embedded database.

Why: `atexit` runs handlers last-registered-first, and the embedded database's stop was registered
while connecting, i.e. before the rate limiter's MongoDB client existed. A `flask` command then
stopped the database first; at interpreter teardown the limiter storage's `__del__` closed its
client, which tried to end its server sessions against the stopped server and hung (no server
running) or printed "Exception ignored ... __del__" (server running). One handler, registered
once, runs the steps in the order that works, whatever was registered when.
"""

from __future__ import annotations

import atexit
import logging
import threading
import weakref
from collections.abc import Callable
from typing import Protocol

log = logging.getLogger(__name__)


class Closable(Protocol):
    def close(self, grace_s: float = 0) -> None: ...


_open: weakref.WeakSet[Closable] = weakref.WeakSet()
_db_stops: list[Callable[[], object]] = []
_lock = threading.Lock()
_registered = False


def _ensure_registered() -> None:
    global _registered
    with _lock:
        if not _registered:
            atexit.register(run_exit)
            _registered = True


def track(services: Closable) -> None:
    """Close `services` at process exit (before the embedded database stops) unless closed before."""
    _ensure_registered()
    _open.add(services)


def untrack(services: Closable) -> None:
    _open.discard(services)


def stop_db_at_exit(stop: Callable[[], object]) -> None:
    """Run `stop` at process exit, after every tracked app is closed."""
    _ensure_registered()
    with _lock:
        _db_stops.append(stop)


def run_exit() -> None:
    """Close every tracked app, then stop the embedded database (if this process started it)."""
    for services in list(_open):
        try:
            services.close(grace_s=0)
        except Exception:  # noqa: BLE001 - one app failing to close must not keep the database running
            log.warning("closing an app at exit failed", exc_info=True)
    with _lock:
        stops, _db_stops[:] = list(_db_stops), []
    for stop in stops:
        try:
            stop()
        except Exception:  # noqa: BLE001 - the next stop still runs; the log says what failed
            log.warning("stopping the embedded database at exit failed", exc_info=True)
