"""Which MongoDB commands a piece of code sends: pymongo's own command monitoring, no patching.

Register a `CommandLog` with `monitoring.register` (every client created afterwards reports to it) or
pass it in a client's `event_listeners`. It keeps, in order, (command name, collection) of every
command started on one database.
"""

from __future__ import annotations

import threading
from collections import Counter

from pymongo import monitoring


class CommandLog(monitoring.CommandListener):
    """(command name, collection) of every command started on `database`, in order."""

    def __init__(self, database: str) -> None:
        self.database = database
        self.seen: list[tuple[str, str]] = []
        self.active = True  # pymongo has no unregister: a registered log goes quiet after its test
        self._lock = threading.Lock()

    def started(self, event: monitoring.CommandStartedEvent) -> None:
        if not self.active or event.database_name != self.database:
            return
        target = event.command.get(event.command_name)
        with self._lock:
            self.seen.append((event.command_name, target if isinstance(target, str) else ""))

    def succeeded(self, event: monitoring.CommandSucceededEvent) -> None:
        return None

    def failed(self, event: monitoring.CommandFailedEvent) -> None:
        return None

    def clear(self) -> None:
        with self._lock:
            self.seen.clear()

    @property
    def counts(self) -> Counter[tuple[str, str]]:
        """How many of each (command name, collection)."""
        with self._lock:
            return Counter(self.seen)

    def on(self, *collections: str) -> int:
        """How many commands went to any of `collections`."""
        with self._lock:
            return sum(1 for _, coll in self.seen if coll in collections)
