"""Leases on MongoDB documents: a holder owns a document until its `lease_until` passes.

Several parts of the server share this pattern: the global LLM slots, the SD pool's instances,
jobs and in-progress records (an ideation request runs inside its HTTP request, not as a job).
Each process keeps what it holds alive by pushing `lease_until` out every `ttl_s / 3`; once the
holder dies, nobody renews, the lease runs out and anyone may take the document over (or a
reaper fails it). This module holds the pieces they share: the expiry arithmetic, the "free or
expired" filter and one renewer that batches every held lease into one update per collection.

Clocks: lease times are compared with each process's UTC clock, so hosts sharing a database need
synchronised clocks (NTP); skew only shortens or lengthens leases.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from pymongo.collection import Collection
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

LEASE_FIELD = "lease_until"


def utcnow() -> datetime:
    return datetime.now(UTC)


def lease_until(ttl_s: float, now: datetime | None = None) -> datetime:
    """When a lease taken or renewed now runs out."""
    return (now or utcnow()) + timedelta(seconds=ttl_s)


def takeable(now: datetime, holder_field: str = "holder") -> dict[str, Any]:
    """Filter: documents nobody holds, or whose holder's lease ran out (the holder died)."""
    return {"$or": [{holder_field: None}, {LEASE_FIELD: {"$lt": now}}]}


def expired(now: datetime) -> dict[str, Any]:
    """Filter: documents whose lease ran out."""
    return {LEASE_FIELD: {"$lt": now}}


def renew_leases(
    collection: Collection,
    doc_ids: list[Any],
    *,
    field: str,
    values: list[Any],
    ttl_s: float,
    now: datetime | None = None,
    until_field: str = LEASE_FIELD,
) -> int:
    """Push out the leases of `doc_ids` whose `field` is still one of `values` (still ours), in one update;
    returns how many documents matched. `until_field`: where the expiry lives (a document with several
    leases, such as an SD instance's seats, keeps one per lease)."""
    result = collection.update_many(
        {"_id": {"$in": doc_ids}, field: {"$in": values}},
        {"$set": {until_field: lease_until(ttl_s, now)}},
    )
    return result.matched_count


@dataclass(frozen=True)
class _Held:
    collection: Collection
    doc_id: Any
    field: str  # the lease is still ours while document[field] == value
    value: Any


class LeaseRenewer:
    """Keeps this process's leases alive: one `update_many` per collection and field every `every_s`.

    `hold()` a document after taking it, `drop()` it when done. With `thread=True` a daemon thread
    renews while anything is held (it starts on the first hold and ends when nothing is left);
    with `thread=False` the owner calls `renew()` from its own loop (the job heartbeat does).
    After a fork the child holds nothing: the parent's leases and thread are not its own.
    """

    def __init__(
        self,
        ttl_s: float,
        *,
        name: str,
        thread: bool = True,
        every_s: float | None = None,
        on_lost: Callable[[int], None] | None = None,
    ) -> None:
        self.ttl_s = ttl_s
        self.name = name
        self.every_s = every_s if every_s is not None else max(0.05, ttl_s / 3)
        self._use_thread = thread
        self._on_lost = on_lost
        self._reset()

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._held: dict[tuple[str, Any], _Held] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _check_fork(self) -> None:
        if os.getpid() != self._pid:
            self._reset()

    def hold(self, collection: Collection, doc_id: Any, *, field: str, value: Any) -> None:
        """Renew `doc_id`'s lease from now on, as long as its `field` still equals `value`."""
        self._check_fork()
        with self._lock:
            self._held[(collection.full_name, doc_id)] = _Held(collection, doc_id, field, value)
            if self._use_thread and (self._thread is None or not self._thread.is_alive()):
                self._stop.clear()
                self._thread = threading.Thread(
                    target=self._loop, name=f"{self.name}-lease-renew", daemon=True
                )
                self._thread.start()

    def drop(self, collection: Collection, doc_id: Any) -> None:
        with self._lock:
            self._held.pop((collection.full_name, doc_id), None)

    def held(self) -> int:
        self._check_fork()
        with self._lock:
            return len(self._held)

    def renew(self, now: datetime | None = None) -> int:
        """Push out every held lease; returns how many documents matched (were still ours)."""
        self._check_fork()
        with self._lock:
            held = list(self._held.values())
        if not held:
            return 0
        now = now or utcnow()
        groups: dict[tuple[str, str], list[_Held]] = {}
        for item in held:
            groups.setdefault((item.collection.full_name, item.field), []).append(item)
        matched = 0
        for (_, field), items in groups.items():
            values = list({repr(i.value): i.value for i in items}.values())
            matched += renew_leases(
                items[0].collection,
                [i.doc_id for i in items],
                field=field,
                values=values,
                ttl_s=self.ttl_s,
                now=now,
            )
        lost = len(held) - matched
        if lost > 0:
            log.warning("%s: %d lease(s) were lost before renewal (expired and taken over)", self.name, lost)
            if self._on_lost is not None:
                self._on_lost(lost)
        return matched

    def _loop(self) -> None:
        while not self._stop.wait(self.every_s):
            with self._lock:
                if not self._held:
                    self._thread = None
                    return
            try:
                self.renew()
            except PyMongoError as exc:
                log.error(
                    "%s: could not renew leases (they run out in %.0f s): %s", self.name, self.ttl_s, exc
                )

    def close(self) -> None:
        self._stop.set()
