"""The Stable Diffusion instance pool, shared by every worker process and host through MongoDB.

Why: the originals kept their pool inside each process. Under `gunicorn -w 4` every worker believed
every instance was free, so instances queued several generations deep while others idled; a dead
instance yielded empty images; a hung one stalled every worker forever. Here all processes share one
view: `sd_instances` (an instance's lease seats; `health.py`, `seats.py`), `sd_waiters` (the queue,
`queue.py`), `sd_pool_members` (wake-up ports, `handover.py`). An instance changes hands only through
atomic single-document updates: the finishing caller hands it to the oldest waiter with a datagram
hint (`handover.py`); a caller finding the queue empty claims idle instances itself (`claim_idle`);
else by the FIFO plan each process's watcher computes from one snapshot (`planner.py`); the watcher
also renews leases, delivers lost hints and probes down instances. With `SD_QUEUE_DEPTH=2` a caller on
a busy instance's second seat sends shortly before the running image ends (`holdback.py`); dead
holders' leases expire; failed calls are retried elsewhere (`retrying.py`); every call and wait has a
timeout. Hosts sharing a pool need synchronised clocks (NTP). The whole story: docs/pool.md.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TypeVar

from pymongo import ASCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from agent.images.sdwebui import health, holdback, retrying, seats
from agent.images.sdwebui.claims import claim_free, claim_idle_many, claim_planned
from agent.images.sdwebui.client import PROVIDER, SDClient, SDError
from agent.images.sdwebui.handover import (
    MEMBERS_REFRESH_S,
    RENEW,
    WAKE,
    Grant,
    Members,
    Waker,
    hand_over,
    read_messages,
)
from agent.images.sdwebui.planner import Pick, plan_seats, up_urls, want
from agent.images.sdwebui.queue import COUNTER_ID, Entry, Lease, Slot, WaitQueue, process_of
from agent.images.sdwebui.retrying import RunInfo
from agent.images.sdwebui.status import PoolStatus
from agent.leases import utcnow
from agent.types import ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")

SNAPSHOT_MAX_AGE_S = 1.0
FINISHED_KEEP = 4096  # recently finished lease ids remembered, so a stale read never revives one


def ensure_pool_indexes(db: Database) -> None:
    """Idempotent; called by every pool at construction."""
    db.sd_waiters.create_index([("ticket", ASCENDING)])
    db.sd_waiters.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)
    db.sd_instances.create_index([("state", ASCENDING)])
    db.sd_pool_members.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)


class SDInstancePool(PoolStatus):
    """Fair, cross-process, health-checked leasing of SD WebUI instances (see the module docstring).

    Leases on `sd_instances` use `agent.leases` (`takeable`, `lease_until`, `renew_leases`),
    but not its `LeaseRenewer`: that one keeps one lease per document, while this pool keeps
    its leases by lease id and may briefly hold two on one instance (an expired lease still
    being released and the one that succeeded it), and it renews them in the watcher's loop
    together with its queue entries (`WaitQueue.renew`), at `min(lease_s, waiter_ttl_s) / 3`.
    """

    def __init__(
        self,
        db: Database,
        urls: list[str],
        *,
        timeout_s: float = 180.0,
        wait_timeout_s: float = 300.0,
        lease_s: float = 60.0,
        max_attempts: int = 3,
        poll_s: float = 0.25,
        probe_base_s: float = 2.0,
        probe_max_s: float = 60.0,
        ping_timeout_s: float = 2.0,
        waiter_ttl_s: float = 5.0,
        join_window_s: float = 0.02,
        max_waiters_read: int = 256,
        handover: bool = True,
        depth: int = 2,
        send_ahead_s: float = 0.3,
    ) -> None:
        if db is None:
            raise ValueError("the SD instance pool needs MongoDB (it is how workers share the instances)")
        urls = list(dict.fromkeys(u.rstrip("/") for u in urls if u))
        if not urls:
            raise ValueError("the SD instance pool needs at least one instance URL (SD_INSTANCES)")
        self.db = db
        self.urls = urls
        self.timeout_s = timeout_s
        self.wait_timeout_s = wait_timeout_s
        self.lease_s = lease_s
        self.max_attempts = max(1, max_attempts)
        self.poll_s = poll_s
        self.probe_base_s = probe_base_s
        self.ping_timeout_s = ping_timeout_s
        self.waiter_ttl_s = waiter_ttl_s
        self.handover = handover  # False: no hand-over, no datagrams: claims by polling only (for comparison)
        self.depth = seats.clamp_depth(depth)  # lease seats: 1 running + depth-1 queued in the WebUI
        self.send_ahead_s = send_ahead_s  # a queued call is sent when the running image has this left
        self.freed = holdback.FreedSignal()
        self.clients = {u: SDClient(u, timeout_s, ping_timeout_s=ping_timeout_s) for u in urls}
        # a caller queued behind a running image waits for both (same connections, doubled read timeout)
        self.queued_clients = {u: c.with_timeout(timeout_s * 2) for u, c in self.clients.items()}
        self.hostname = socket.gethostname()
        self.process_id = self._new_process_id()
        self.max_queue_seen = 0  # deepest queue (waiting callers) this process's watcher observed
        self.handovers = 0  # instances this process handed straight to a waiting caller
        self.claims = 0  # instances this process claimed (fast or by plan)
        self._lock = threading.Lock()
        self.queue = WaitQueue(
            db,
            self._lock,
            join_window_s=join_window_s,
            waiter_ttl_s=waiter_ttl_s,
            max_waiters_read=max_waiters_read,
        )
        self.members = Members(db, self.hostname)
        self.prober = health.Prober(
            db,
            self.clients,
            ping_timeout_s=ping_timeout_s,
            probe_base_s=probe_base_s,
            probe_max_s=probe_max_s,
            on_done=lambda: self._notify(peers=True),
        )
        self._leases: dict[str, Lease] = {}
        self._finished: deque[str] = deque(maxlen=FINISHED_KEEP)
        self._finished_set: set[str] = set()
        self._up: tuple[float, set[str]] = (0.0, set(urls))  # (monotonic time, up instances) last seen
        self._seq = itertools.count(1)
        self._waker: Waker | None = None
        self._closed = threading.Event()
        self._stopping = threading.Event()  # shutdown: no new leases for this process's callers
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        ensure_pool_indexes(db)
        try:  # create the ticket counter up front: racing first-ever upserts are where databases stumble
            db.counters.update_one({"_id": COUNTER_ID}, {"$setOnInsert": {"seq": 0}}, upsert=True)
        except DuplicateKeyError:
            pass
        health.register_instances(db, urls, probe_base_s)

    def _new_process_id(self) -> str:
        return f"{self.hostname}:{os.getpid()}:{secrets.token_hex(3)}"

    def _next_id(self, kind: str) -> str:
        return f"{self.process_id}:{kind}{next(self._seq)}"

    def close(self) -> None:
        """Stop the watcher, free every instance this process still holds (a restarted worker must not
        find them leased for `lease_s`), leave the member list, close the HTTP clients."""
        self._stopping.set()
        self._closed.set()
        self._notify()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        if self._waker is not None:
            self._waker.close()
        try:
            self.release_held()
            self.members.leave(self.process_id)
        except PyMongoError as exc:
            log.warning(
                "SD pool: could not free this process's leases at close (they expire in %.0f s): %s",
                self.lease_s,
                exc,
            )
        for client in self.clients.values():
            client.close()

    def interrupt_held(self) -> int:
        """Shutdown: grant no new lease to our callers (a 503 ModelError) and ask each instance whose every busy
        seat is ours to stop its generation (the WebUI returns what it has; the caller records and releases).
        Never another process's generation. Called again while jobs run (the queued one starts next)."""
        self._stopping.set()
        self.freed.pulse()  # held-back calls look now: they are not sent any more
        with self._lock:
            urls = {lease.url for lease in self._leases.values() if lease.url}
        for slot in self.queue.slots():
            slot.event.set()  # waiting callers look again and see the pool stopping
        try:
            urls = set(seats.ours_running(self.db, urls, self.process_id + ":", utcnow())) if urls else urls
        except PyMongoError as exc:
            log.warning("SD pool: cannot tell whose generations run at shutdown, interrupting none: %s", exc)
            urls = set()
        for url in urls:
            try:
                self.clients[url].interrupt(timeout_s=self.ping_timeout_s)
            except (SDError, RuntimeError) as exc:
                log.warning("SD pool: could not interrupt %s at shutdown: %s", url, exc)
        return len(urls)

    def release_held(self) -> int:
        """Free the instances whose lease belongs to this process (held, or handed to one of our queue
        entries); a call still running on one is abandoned. Returns how many were freed."""
        freed = health.free_held(self.db, self.urls, self.process_id + ":")
        if freed:
            log.warning("SD pool: freed %d instance(s) still leased by this process at close", freed)
        return freed

    # ------------------------------------------------------------------ waking
    def _notify(self, peers: bool = False, look: bool = True) -> None:
        """Make our watcher look now (look=False: just wake it, e.g. to start renewing a new lease);
        with peers=True also the other pool processes on this host."""
        waker = self._waker
        if waker is None:
            return
        waker.wake(WAKE if look else RENEW)
        if peers and self.handover:
            for port in list(self.members.peers.values()):
                waker.send(port)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked after use: threads and local state did not come along
                self._pid = os.getpid()
                self.process_id = self._new_process_id()
                self.queue.reset()
                self._leases.clear()
                self.prober.reset()
                self.members.peers = {}
                self._thread = None
                self._waker = None
            if self._waker is None:
                self._waker = Waker()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sd-pool-watcher", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------ leasing
    def acquire(
        self, checkpoint: str | None = None, exclude: Iterable[str] = (), timeout_s: float | None = None
    ) -> Lease:
        """Wait (FIFO across all processes) for a free up instance; raise ModelError(503) on timeout."""
        if self._closed.is_set() or self._stopping.is_set():
            raise self._closed_error()
        timeout_s = self.wait_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        exclude = sorted(set(exclude))
        self._ensure_thread()
        lease = self._fast_claim(checkpoint, exclude)
        if lease is not None:
            lease.wait_ms = (time.monotonic() - start) * 1000
            return lease
        slot = Slot()
        try:
            entry = self._join(checkpoint, exclude, slot)
        except PyMongoError as exc:
            raise ModelError(
                f"the SD pool cannot reach its database: {exc}",
                provider=PROVIDER,
                status=503,
                retryable=True,
                kind="image",
            ) from exc
        slot.event.wait(timeout_s)
        lease = self.queue.leave(entry, slot)
        if lease is not None:
            lease.wait_ms = (time.monotonic() - start) * 1000
            return lease
        self.queue.give_up(entry)
        self._notify(peers=True)  # we may have been first in line: the others can stop waiting for us
        if self._stopping.is_set():
            raise self._closed_error()
        raise health.timeout_error(self.db, self.urls, self.queue.length, timeout_s)

    def _closed_error(self) -> ModelError:
        return ModelError(
            "the SD pool is closed: the server is shutting down", provider=PROVIDER, status=503, kind="image"
        )

    def _join(self, checkpoint: str | None, exclude: list[str], slot: Slot) -> Entry:
        entry = self.queue.join(lambda: self._next_id("q"), self.process_id, checkpoint, exclude, slot)
        self._notify()
        return entry

    def _nobody_waits(self, now: datetime) -> bool:
        """No queue here (ours, or one we just saw) nor in the database: a claim overtakes nobody."""
        if self.queue.waiting() or self.queue.recently_busy(self.poll_s):
            return False
        return self.queue.seems_empty(now)

    def _fast_claim(self, checkpoint: str | None, exclude: list[str]) -> Lease | None:
        """Nobody waiting: take a free instance at once (one read, one atomic claim) instead of queueing.

        Only when the queue is empty, so it never overtakes a waiting caller (one that
        arrives between our read and our claim is a simultaneous arrival; the atomic claim
        decides). None: someone is waiting or nothing is free; join the queue.
        """
        candidates = [u for u in self.urls if u not in exclude]
        if not candidates:
            return None
        now = utcnow()
        if not self._nobody_waits(now):
            return None
        lease = Lease(id=self._next_id("f"), url="", ticket=0)
        with self._lock:
            self._leases[lease.id] = lease  # known locally before it exists in the database (orphan check)
        try:
            got = claim_free(self.db, candidates, lease.id, checkpoint, self.lease_s, now, self.depth)
        except PyMongoError:
            got = None
        if got is None:
            with self._lock:
                self._leases.pop(lease.id, None)
            return None
        doc, lease.seat = got
        lease.queued = seats.other_busy(doc, lease.seat, now, self.depth)
        lease.url = doc["_id"]
        lease.checkpoint = doc.get("checkpoint")
        self.claims += 1
        self._notify(look=False)  # the watcher renews the lease from now on
        return lease

    def claim_idle(self, n: int, checkpoint: str | None = None, exclude: Iterable[str] = ()) -> list[Lease]:
        """Up to n fully idle instances at once for the images of one request, when nobody waits (the fast
        claim, batched: `claims.claim_idle_many`). The caller runs one call on each (`run(lease=...)`) and
        gets the rest the ordinary way; [] when the queue is not empty or nothing is idle. Also how a
        held-back call moves to an idle instance (`holdback.py`)."""
        skip = set(exclude)
        candidates = [u for u in self.urls if u not in skip]
        if n < 1 or not candidates or self._closed.is_set() or self._stopping.is_set():
            return []
        start = time.monotonic()
        self._ensure_thread()
        now = utcnow()
        if not self._nobody_waits(now):
            return []
        leases = [Lease(id=self._next_id("f"), url="", ticket=0) for _ in range(min(n, len(candidates)))]
        with self._lock:  # known locally before they exist in the database (orphan check)
            self._leases.update((lease.id, lease) for lease in leases)
        ids = [lease.id for lease in leases]
        try:
            got = claim_idle_many(self.db, candidates, ids, checkpoint, self.lease_s, now, self.depth)
        except PyMongoError as exc:
            log.warning("SD pool: claiming idle instances failed (%s); claiming one by one", exc)
            got = []
        docs = {holder: doc for doc, holder in got}
        claimed = []
        wait_ms = (time.monotonic() - start) * 1000
        with self._lock:
            for lease in leases:
                doc = docs.get(lease.id)
                if doc is None:
                    self._leases.pop(lease.id, None)
                    continue
                lease.url, lease.checkpoint, lease.wait_ms = doc["_id"], doc.get("checkpoint"), wait_ms
                claimed.append(lease)
        if claimed:
            self.claims += len(claimed)
            self._notify(look=False)  # the watcher renews the leases from now on
        return claimed

    def release(
        self, lease: Lease, *, ok: bool = True, error: SDError | None = None, checkpoint: str | None = None
    ) -> None:
        """Done with the instance: hand it to the next waiting caller, or free it, and record what the call
        said about its health. Only acts if we still hold it."""
        try:
            self._release(lease, ok=ok, error=error, checkpoint=checkpoint)
        finally:
            # only now: until the database says otherwise, our scan must not take it for an orphan
            with self._lock:
                self._leases.pop(lease.id, None)
                if len(self._finished) == self._finished.maxlen:
                    self._finished_set.discard(self._finished[0])
                self._finished.append(lease.id)
                self._finished_set.add(lease.id)

    def _release(self, lease: Lease, *, ok: bool, error: SDError | None, checkpoint: str | None) -> None:
        if ok and self.handover:
            grant = hand_over(
                self.db,
                lease,
                checkpoint,
                queue=self.queue.seen[1],
                up=self.up_instances,
                lease_s=self.lease_s,
                waiter_ttl_s=self.waiter_ttl_s,
                depth=self.depth,
            )
            if grant is not None:
                self.handovers += 1
                self._tell(grant)
                return
        health.record_release(
            self.db,
            lease,
            ok=ok,
            error=error,
            checkpoint=checkpoint,
            probe_base_s=self.probe_base_s,
            lease_s=self.lease_s,
        )
        self.freed.pulse()
        self._notify(peers=True)

    def _tell(self, grant: Grant) -> None:
        """Tell the entry's process that it now holds a seat (its scan finds out anyway)."""
        process = process_of(grant.lease_id)
        if process == self.process_id:
            self._grant(grant)
            return
        port = self.members.port_of(process)
        waker = self._waker
        if port and waker is not None:
            waker.hint(port, grant)

    def _grant(self, grant: Grant) -> None:
        """Our entry was given a seat: wake its oldest waiting caller, or, if nobody waits any more, free
        the seat."""
        lease_id = grant.lease_id
        with self._lock:
            if lease_id in self._leases or lease_id in self._finished_set:
                return  # already delivered (hint and scan both saw it), or already done with
            entry, slot = self.queue.take_slot(lease_id)
            if slot is not None:
                assert entry is not None
                slot.lease = Lease(
                    id=lease_id, url=grant.url, ticket=entry.ticket, seat=grant.seat, queued=grant.queued
                )
                self._leases[lease_id] = slot.lease
        if slot is not None:
            slot.event.set()
            self._notify(look=False)  # the watcher renews the lease from now on
        else:
            self._free_orphan(lease_id, grant.url, grant.seat)

    def _free_orphan(self, holder: str, url: str, seat: int) -> None:
        """A seat given to a caller of ours that is gone: put it back."""
        try:
            freed = health.free(self.db, url, holder, seat)
        except PyMongoError as exc:
            log.warning("could not free %s (it frees itself when the lease runs out): %s", url, exc)
            return
        if freed:
            self._notify(peers=True)

    def client_for(self, lease: Lease) -> SDClient:
        """The client for a call on `lease`: with the doubled read timeout when it queues behind another."""
        return (self.queued_clients if lease.queued else self.clients)[lease.url]

    def up_instances(self) -> set[str]:
        """The up instances, as last seen (read again when older than a second)."""
        seen_at, up = self._up
        if time.monotonic() - seen_at > SNAPSHOT_MAX_AGE_S:
            up = up_urls(self.db.sd_instances.find({"_id": {"$in": self.urls}}, {"state": 1}))
            self._up = (time.monotonic(), up)
        return up

    # ------------------------------------------------------------------ watcher thread
    def _loop(self) -> None:
        renew_every = max(0.05, min(self.lease_s, self.waiter_ttl_s) / 3)
        next_renew = next_members = next_scan = next_probe = 0.0
        waker = self._waker
        assert waker is not None
        look = True
        while not self._closed.is_set():
            self.queue.retire()
            with self._lock:
                waiting = any(e.waiting for e in self.queue.entries.values())
                holding = bool(self._leases)
            if not waiting and not holding:
                look = self._handle(waker.wait(1.0)) or look
                continue
            try:
                now = time.monotonic()
                if now >= next_members:
                    if self.handover:
                        self.members.refresh(self.process_id, waker.port)
                    next_members = now + MEMBERS_REFRESH_S
                if now >= next_renew:
                    self._renew()
                    next_renew = now + renew_every
                if waiting and (look or now >= next_scan):
                    look = False
                    self._scan()
                    next_scan = time.monotonic() + self.poll_s * random.uniform(0.75, 1.25)
                    next_probe = time.monotonic() + SNAPSHOT_MAX_AGE_S  # the scan probed
                elif now >= next_probe:
                    # nobody of ours waits (with depth 2 a burst can fit in the seats): still probe the down
                    # instances, or one would stay out of the pool for as long as nobody queues
                    self._up = (now, health.probe_due(self.db, self.urls, self.prober, self.process_id))
                    next_probe = now + SNAPSHOT_MAX_AGE_S
            except Exception as exc:  # noqa: BLE001 - the watcher must survive a database hiccup
                log.warning("SD pool watcher: %s", exc)
                look = False
                next_scan = time.monotonic() + self.poll_s
            deadline = min(next_scan, next_renew) if waiting else min(next_probe, next_renew)
            look = self._handle(waker.wait(deadline - time.monotonic())) or look

    def _handle(self, messages: list[bytes]) -> bool:
        """Act on hand-over datagrams; True if any message asks for a look (then a peer may have freed an
        instance: held-back calls look too)."""
        grants, look = read_messages(messages, self.process_id, self.clients)
        for grant in grants:
            self._grant(grant)
        if look:
            self.freed.pulse()
        return look

    def _renew(self) -> None:
        """Push out our leases and keep our waiting entries in the queue."""
        now = utcnow()
        with self._lock:
            leases = [lease for lease in self._leases.values() if lease.url]
        if leases:
            matched = seats.renew(
                self.db, [(lease.url, lease.id, lease.seat) for lease in leases], self.lease_s, now
            )
            if matched < len(leases):
                log.debug(
                    "SD pool: %d of %d leases not renewed (released meanwhile, or expired)",
                    len(leases) - matched,
                    len(leases),
                )
        self.queue.renew(now)

    def _scan(self) -> None:
        now = utcnow()
        instances = list(self.db.sd_instances.find({"_id": {"$in": self.urls}}))
        self._up = (time.monotonic(), up_urls(instances))
        prefix = self.process_id + ":"
        for doc in instances:
            for seat, holder in seats.holders(doc):
                if not holder.startswith(prefix):
                    continue
                with self._lock:
                    mine = holder in self._leases or holder in self._finished_set
                if not mine:  # given to us, but the hint was lost or never sent (or the caller is gone)
                    queued = seats.other_busy(doc, seat, now, self.depth)
                    self._grant(Grant(holder, doc["_id"], seat, queued))
        self.prober.start_due(instances, now, self.process_id)
        waiters = self.queue.read(now)
        depth = sum(want(w) for w in waiters)
        if depth > self.max_queue_seen:
            self.max_queue_seen = depth
            health.note_queue_depth(self.db, depth)
        local = self.queue.ids()
        for pick in plan_seats(waiters, instances, now, self.depth):
            if pick.entry in local:
                self._claim(pick)

    def _claim(self, pick: Pick) -> None:
        """Take one of our entry's wanted instances off the queue, then the free seat planned for it."""
        now = utcnow()
        claimed = claim_planned(self.db, pick, self.lease_s, now, self.depth)
        if claimed is None:
            self._notify()  # the snapshot was stale (someone took the seat first): plan again now
            return
        lease_id, got = claimed
        self.claims += 1
        self._grant(Grant(lease_id, pick.url, pick.seat, seats.other_busy(got, pick.seat, now, self.depth)))
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.checkpoint = got.get("checkpoint")

    # ------------------------------------------------------------------ running calls
    def run(
        self,
        call: Callable[[SDClient], tuple[T, str | None]],
        *,
        checkpoint: str | None = None,
        what: str = "image generation",
        lease: Lease | None = None,
    ) -> tuple[T, RunInfo]:
        """Run `call(client)` on a leased instance (first on `lease`, one from `claim_idle`, if given),
        retrying on another instance when it fails (`retrying.run`). `call` returns (value, checkpoint
        now loaded or None) and raises SDError."""
        return retrying.run(self, call, checkpoint=checkpoint, what=what, lease=lease)

    def hold_back(self, lease: Lease, exclude: list[str], checkpoint: str | None) -> Lease:
        """The lease to send a call on, once a queued one's turn is near (`holdback.hold_back`)."""
        return holdback.hold_back(self, lease, exclude, checkpoint)

    def stopping_error(self) -> ModelError | None:
        """The 503 for a caller of this process once shutdown began, else None."""
        return self._closed_error() if self._stopping.is_set() else None
