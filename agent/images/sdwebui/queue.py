"""The pool's shared queue (`sd_waiters`) and this process's side of it: entries, waiting callers, tickets.

`sd_waiters` holds one document per waiting request, `{ticket, want, granted, checkpoint,
exclude, expires_at}`. `ticket` is strictly increasing (the `counters` collection), `want` is
how many of its callers still wait for an instance (the images of one request arrive together
and share an entry: callers of one process with the same checkpoint arriving within
`join_window_s` of each other), `granted` numbers the leases given to it, `exclude` lists
instances that already failed the caller. `expires_at` is renewed while someone waits, so a
dead process drops out of the queue within `waiter_ttl_s` (a TTL index deletes the document
later).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from agent.images.sdwebui.planner import checkpoint_key, want
from agent.leases import lease_until, utcnow

COUNTER_ID = "sd_waiters"


@dataclass
class Lease:
    """The right to run one call on one instance, until released (or `lease_until` passes)."""

    id: str
    url: str
    ticket: int
    checkpoint: str | None = None  # what the instance had loaded when claimed (None after a hand-over)
    wait_ms: float = 0.0
    seat: int = 0  # which of the instance's seats (`seats.py`)
    queued: bool = False  # another seat was busy at grant time: the WebUI runs ours after that one


def entry_of(lease_id: str) -> str:
    """Lease ids given to a queue entry are `<entry id>#<n>`; fast-claim leases are their own entry."""
    return lease_id.split("#", 1)[0]


def process_of(lease_id: str) -> str:
    """The pool process whose entry (or fast claim) a lease id belongs to."""
    return entry_of(lease_id).rsplit(":", 1)[0]


class Slot:
    """One waiting caller."""

    __slots__ = ("event", "lease")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lease: Lease | None = None


class Entry:
    """This process's side of one queue document: the callers waiting on it, oldest first."""

    __slots__ = (
        "id",
        "key",
        "checkpoint",
        "exclude",
        "created",
        "ticket",
        "waiting",
        "uncounted",
        "registered",
        "db_lock",
    )

    def __init__(self, entry_id: str, checkpoint: str | None, exclude: list[str]) -> None:
        self.id = entry_id
        self.key = (checkpoint_key(checkpoint), tuple(exclude))
        self.checkpoint = checkpoint
        self.exclude = exclude
        self.created = time.monotonic()
        self.ticket = 0
        self.waiting: deque[Slot] = deque()
        self.uncounted = 0  # callers that joined but are not yet in the document's `want`
        self.registered = False
        self.db_lock = threading.Lock()  # orders this entry's insert / $inc


class WaitQueue:
    """`sd_waiters` and this process's entries in it.

    `lock` is the pool's lock: the entries are read together with the pool's leases (a grant
    takes a waiting caller and records its lease atomically), so they share one lock.
    """

    def __init__(
        self,
        db: Database,
        lock: threading.Lock,
        *,
        join_window_s: float,
        waiter_ttl_s: float,
        max_waiters_read: int,
    ) -> None:
        self.db = db
        self.lock = lock
        self.join_window_s = join_window_s
        self.waiter_ttl_s = waiter_ttl_s
        self.max_waiters_read = max_waiters_read
        self.entries: dict[str, Entry] = {}  # our queue entries (registered or about to be)
        self.open: dict[
            tuple[Any, ...], Entry
        ] = {}  # entries still accepting callers, by (checkpoint, exclude)
        self.seen: tuple[float, list[dict[str, Any]]] = (0.0, [])  # (monotonic time, queue) last read
        self.empty_at = -1e9  # when we last saw the queue empty (monotonic)

    def reset(self) -> None:
        """After a fork: the parent's waiting callers are not ours."""
        self.entries.clear()
        self.open.clear()

    # ---- this process's entries
    def waiting(self) -> bool:
        with self.lock:
            return any(e.waiting for e in self.entries.values())

    def slots(self) -> list[Slot]:
        with self.lock:
            return [slot for entry in self.entries.values() for slot in entry.waiting]

    def ids(self) -> set[str]:
        with self.lock:
            return set(self.entries)

    def take_slot(self, lease_id: str) -> tuple[Entry | None, Slot | None]:
        """The oldest caller waiting on the entry `lease_id` was granted to (call with the lock held)."""
        entry = self.entries.get(entry_of(lease_id))
        slot = entry.waiting.popleft() if entry is not None and entry.waiting else None
        return entry, slot

    def leave(self, entry: Entry, slot: Slot) -> Lease | None:
        """A caller stops waiting: its lease if one arrived meanwhile, else it leaves the entry."""
        with self.lock:
            lease = slot.lease
            if lease is None and slot in entry.waiting:
                entry.waiting.remove(slot)
        return lease

    def join(
        self,
        new_id: Callable[[], str],
        process_id: str,
        checkpoint: str | None,
        exclude: list[str],
        slot: Slot,
    ) -> Entry:
        """Add a waiting caller to the queue: to the entry this process opened for the same checkpoint a
        moment ago (the other images of the same request), else to a new entry with a new ticket."""
        key = (checkpoint_key(checkpoint), tuple(exclude))
        with self.lock:
            entry = self.open.get(key)
            if entry is None or time.monotonic() - entry.created > self.join_window_s:
                entry = Entry(new_id(), checkpoint, exclude)
                self.open[key] = entry
                self.entries[entry.id] = entry  # known before it exists in the database: a grant may follow
            entry.waiting.append(slot)
            entry.uncounted += 1
        with entry.db_lock:
            with self.lock:
                count, entry.uncounted = entry.uncounted, 0
            if count:
                now = utcnow()
                if not entry.registered:
                    entry.ticket = self.ticket()
                    self.db.sd_waiters.insert_one(
                        {
                            "_id": entry.id,
                            "ticket": entry.ticket,
                            "want": count,
                            "granted": 0,
                            "checkpoint": checkpoint,
                            "ckey": checkpoint_key(checkpoint),
                            "exclude": exclude,
                            "process": process_id,
                            "enqueued_at": now,
                            "expires_at": lease_until(self.waiter_ttl_s, now),
                        }
                    )
                    entry.registered = True
                else:
                    self.db.sd_waiters.update_one({"_id": entry.id}, {"$inc": {"want": count}})
        return entry

    def give_up(self, entry: Entry) -> None:
        """A caller timed out: take one unit of `want` back (if none is left, a lease is on its way to this
        entry; with nobody left to take it, it is freed when it arrives)."""
        try:
            self.db.sd_waiters.update_one({"_id": entry.id, "want": {"$gt": 0}}, {"$inc": {"want": -1}})
        except PyMongoError:
            pass  # the entry expires on its own

    def retire(self) -> None:
        """Delete the queue documents of entries whose callers are all served or gone and that no new
        caller can join any more (off everyone's critical path)."""
        now = time.monotonic()
        with self.lock:
            done = [
                e
                for e in self.entries.values()
                if not e.waiting and not e.uncounted and now - e.created > self.join_window_s
            ]
            for e in done:
                del self.entries[e.id]
                if self.open.get(e.key) is e:
                    del self.open[e.key]
        ids = [e.id for e in done if e.registered]
        if ids:
            try:
                self.db.sd_waiters.delete_many({"_id": {"$in": ids}})
            except PyMongoError:
                pass  # they expire on their own

    def renew(self, now: datetime) -> None:
        """Keep our entries with waiting callers in the queue for another `waiter_ttl_s`."""
        with self.lock:
            entry_ids = [e.id for e in self.entries.values() if e.registered and e.waiting]
        if entry_ids:
            self.db.sd_waiters.update_many(
                {"_id": {"$in": entry_ids}},
                {"$set": {"expires_at": lease_until(self.waiter_ttl_s, now)}},
            )

    # ---- the shared queue
    def ticket(self) -> int:
        """The next number of the global queue: strictly increasing across all processes and hosts."""
        for _ in range(5):
            try:
                doc = self.db.counters.find_one_and_update(
                    {"_id": COUNTER_ID},
                    {"$inc": {"seq": 1}},
                    upsert=True,
                    return_document=ReturnDocument.AFTER,
                )
            except DuplicateKeyError:  # two first-ever upserts raced (MongoDB); the document exists now
                continue
            # the embedded server can answer None to racing first-ever upserts; a skipped number is harmless
            if doc is not None:
                return int(doc["seq"])
        raise PyMongoError("could not draw a queue ticket from the counters collection")

    def length(self, now: datetime) -> int:
        """Waiting callers across all processes."""
        return sum(want(d) for d in self.db.sd_waiters.find({"expires_at": {"$gt": now}}, {"want": 1}))

    def read(self, now: datetime) -> list[dict[str, Any]]:
        """The oldest entries with callers still waiting, by ticket (remembered in `seen`)."""
        waiters = list(
            self.db.sd_waiters.find(
                {"expires_at": {"$gt": now}, "want": {"$gt": 0}},
                {"ticket": 1, "checkpoint": 1, "exclude": 1, "want": 1},
            )
            .sort("ticket", ASCENDING)
            .limit(self.max_waiters_read)
        )
        self.seen = (time.monotonic(), waiters)
        return waiters

    def recently_busy(self, max_age_s: float) -> bool:
        """The queue we read less than `max_age_s` ago had someone waiting."""
        seen_at, queue = self.seen
        return time.monotonic() - seen_at < max_age_s and any(want(w) for w in queue)

    def seems_empty(self, now: datetime) -> bool:
        """Nobody waits in the shared queue (False if unsure). The other images of the same request
        (arriving within `join_window_s`) reuse one look at the queue."""
        if time.monotonic() - self.empty_at > self.join_window_s:
            try:
                if self.db.sd_waiters.find_one({"expires_at": {"$gt": now}, "want": {"$gt": 0}}, {"_id": 1}):
                    return False
            except PyMongoError:
                return False
            self.empty_at = time.monotonic()
        return True
