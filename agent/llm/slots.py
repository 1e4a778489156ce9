"""Concurrency caps of LLM calls: one per process (a semaphore) and one shared by every worker on every host.

`GlobalSlots` is a counting semaphore kept in MongoDB (`llm_slots`): `size` lease documents
`{_id: "slot-<i>", holder, lease_until}` (agent.leases). `CallSlots` holds one of each for one attempt.
"""

from __future__ import annotations

import logging
import os
import random
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol

from pymongo import ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import BulkWriteError, PyMongoError

from agent.leases import LeaseRenewer, lease_until, takeable, utcnow
from agent.types import ModelError

log = logging.getLogger(__name__)

SLOTS_COLLECTION = "llm_slots"


class SlotTimeout(ModelError):
    """No concurrency slot came free in time. Not retried: the caller already waited."""


class GlobalSlots:
    """A counting semaphore shared by every process on every host, kept in MongoDB.

    Taking a slot is one atomic update of a free slot picked at random, else one atomic
    find_one_and_update on a slot that is free or whose lease ran out (its holder died), polled
    with short jittered sleeps until `wait_s` passes. A LeaseRenewer keeps the leases this process
    holds alive (every lease_s / 3), so a long stream keeps its slot and a killed
    worker's slot frees itself within `lease_s`.
    """

    def __init__(
        self,
        db: Database,
        size: int,
        *,
        lease_s: float = 60.0,
        wait_s: float = 60.0,
        name: str = "llm",
        collection: str = SLOTS_COLLECTION,
        poll_min_s: float = 0.005,
        poll_max_s: float = 0.1,
    ) -> None:
        if size < 1:
            raise ValueError("GlobalSlots needs size >= 1")
        self.coll = db[collection]
        self.size = size
        self.ids = [f"slot-{i}" for i in range(size)]
        self.lease_s = lease_s
        self.wait_s = wait_s
        self.name = name
        self.poll_min_s = poll_min_s
        self.poll_max_s = poll_max_s
        self._leases = LeaseRenewer(lease_s, name="llm-slot")
        self._lock = threading.Lock()
        self._held: dict[str, str] = {}  # token -> slot id
        self._seq = 0
        self._ready = False
        self._owner_pid = -1
        self._owner = ""

    def _token(self) -> str:
        """A token no other holder uses; a forked worker gets its own owner name."""
        with self._lock:
            pid = os.getpid()
            if pid != self._owner_pid:  # a forked worker: the parent's leases are not ours
                self._owner_pid = pid
                self._owner = f"{socket.gethostname()}:{pid}:{secrets.token_hex(4)}"
                self._held = {}
            self._seq += 1
            return f"{self._owner}:{self._seq}"

    def _ensure_slots(self) -> None:
        if self._ready:
            return
        ops = [
            UpdateOne({"_id": slot_id}, {"$setOnInsert": {"holder": None, "lease_until": None}}, upsert=True)
            for slot_id in self.ids
        ]
        try:
            self.coll.bulk_write(ops, ordered=False)  # one command for all slots, not one per slot
        except BulkWriteError as exc:  # another process created some at the same moment: they exist
            if any(err.get("code") != 11000 for err in exc.details.get("writeErrors", [])):
                raise
        self._ready = True

    def acquire(self) -> str:
        """Take a slot; returns the lease token for release(). Raises SlotTimeout after `wait_s`."""
        start = time.monotonic()
        delay = self.poll_min_s
        token = self._token()
        try:
            self._ensure_slots()
            if self._take_free(token):
                return token
            while True:
                now = utcnow()
                before = self.coll.find_one_and_update(
                    {"_id": {"$in": self.ids}, **takeable(now)},
                    {
                        "$set": {
                            "holder": token,
                            "lease_until": lease_until(self.lease_s, now),
                            "acquired_at": now,
                        }
                    },
                    return_document=ReturnDocument.BEFORE,
                )
                if before is not None:
                    if before.get("holder"):
                        log.warning(
                            "global LLM slot %s: lease of %s had expired; taken over",
                            before["_id"],
                            before["holder"],
                        )
                    self._hold(token, before["_id"])
                    return token
                waited = time.monotonic() - start
                if waited >= self.wait_s:
                    raise SlotTimeout(
                        f"all {self.size} global {self.name} slots stayed busy for {waited:.1f} s "
                        f"(LLM_GLOBAL_CONCURRENCY={self.size}); try again later",
                        provider=self.name,
                        status=503,
                        retryable=True,
                    )
                time.sleep(min(delay * random.uniform(0.5, 1.5), max(0.0, self.wait_s - waited)))
                delay = min(delay * 1.5, self.poll_max_s)
        except PyMongoError as exc:
            raise ModelError(
                f"cannot take a global {self.name} slot: database error: {exc}",
                provider=self.name,
                status=503,
                retryable=True,
            ) from exc

    def _take_free(self, token: str) -> bool:
        """One try at a free slot picked at random (not one this process holds): a plain update of one
        document by _id. Cheaper than the find_one_and_update over every slot on the embedded server:
        acquire + release 3.0-3.4 ms against 5.3-6.0 ms with 32 slots (2026-12-02, a loop of 200 on an
        idle server). A miss (taken meanwhile, or only a dead holder's slot left to take over, which
        the full search logs) falls back to that search."""
        with self._lock:
            mine = set(self._held.values())
        candidates = [slot_id for slot_id in self.ids if slot_id not in mine]
        if not candidates:
            return False
        slot_id = random.choice(candidates)
        now = utcnow()
        taken = self.coll.update_one(
            {"_id": slot_id, "holder": None},
            {"$set": {"holder": token, "lease_until": lease_until(self.lease_s, now), "acquired_at": now}},
        )
        if not taken.modified_count:
            return False
        self._hold(token, slot_id)
        return True

    def _hold(self, token: str, slot_id: str) -> None:
        """A slot just taken under `token`: ours until released, its lease renewed meanwhile."""
        with self._lock:
            self._held[token] = slot_id
        self._leases.hold(self.coll, slot_id, field="holder", value=token)

    def release(self, token: str) -> None:
        with self._lock:
            slot_id = self._held.pop(token, None)
            retaken = slot_id in self._held.values()  # our lease ran out and another call of ours took it
        if slot_id is None:
            return
        if not retaken:
            self._leases.drop(self.coll, slot_id)
        try:
            self.coll.update_one(
                {"_id": slot_id, "holder": token},
                {"$set": {"holder": None, "lease_until": None, "released_at": utcnow()}},
            )
        except PyMongoError as exc:
            log.error(
                "could not release global LLM slot %s (it frees itself in %.0f s): %s",
                slot_id,
                self.lease_s,
                exc,
            )

    def held(self) -> int:
        return self._leases.held()

    def renew(self) -> int:
        """Push out the leases this process holds; returns how many were renewed."""
        return self._leases.renew()

    def close(self) -> None:
        self._leases.close()


class _Timed(Protocol):
    queue_ms: float


class CallSlots:
    """One per-process and (with a GlobalSlots) one global slot, held for the duration of one attempt."""

    def __init__(
        self, provider: str, max_concurrency: int, wait_s: float, global_slots: GlobalSlots | None
    ) -> None:
        self.provider = provider
        self.max_concurrency = max(1, max_concurrency)
        self.wait_s = wait_s
        self.global_slots = global_slots
        self._sem = threading.BoundedSemaphore(self.max_concurrency)

    @contextmanager
    def hold(self, tracker: _Timed | None = None) -> Iterator[None]:
        """Inside: this attempt holds its slots; the time waited for them is added to `tracker.queue_ms`."""
        start = time.perf_counter()
        if not self._sem.acquire(timeout=self.wait_s):
            raise SlotTimeout(
                f"all {self.max_concurrency} {self.provider} slots of this process stayed busy "
                f"for {self.wait_s:g} s (LLM_MAX_CONCURRENCY); try again later",
                provider=self.provider,
                status=503,
                retryable=True,
            )
        token = None
        try:
            if self.global_slots is not None:
                token = self.global_slots.acquire()
            if tracker is not None:
                tracker.queue_ms += (time.perf_counter() - start) * 1000
            yield
        finally:
            if token is not None and self.global_slots is not None:
                self.global_slots.release(token)
            self._sem.release()

    def close(self) -> None:
        if self.global_slots is not None:
            self.global_slots.close()
