"""The Stable Diffusion instance pool, shared by every worker process and host through MongoDB.

Why: the originals kept their pool inside each process. Under `gunicorn -w 4` every
worker believed every instance was free, so instances queued several generations deep
while others idled; a dead instance yielded empty images; a hung one stalled every
worker forever. Here all processes share one view:

- `sd_instances` (one document per instance URL): `state` up/down, `holder` (lease id)
  and `lease_until`, the `checkpoint` last known to be loaded, `failures`,
  `next_probe_at`, `last_error`, `served`.
- `sd_waiters` (the queue): one document per waiting request, `{ticket, want, granted,
  checkpoint, exclude, expires_at}`. `ticket` is strictly increasing (the `counters`
  collection), `want` is how many of its callers still wait for an instance (the images
  of one request arrive together and share an entry: callers of one process with the same
  checkpoint arriving within `join_window_s` of each other), `granted` numbers the leases
  given to it, `exclude` lists instances that already failed the caller. `expires_at` is
  renewed while someone waits, so a dead process drops out of the queue within
  `waiter_ttl_s` (a TTL index deletes the document later).
- `sd_pool_members`: one document per process using the pool, with its wake-up port.

How an instance changes hands (every step an atomic single-document update):

1. Hand-over (the busy path). A caller that finishes a generation hands its instance
   straight to the queue's oldest entry: `find_one_and_update({want > 0, not excluding
   this instance}, {want -1, granted +1}, sort by ticket)` (within the first round of
   entries, as many as there are instances, one that wants this instance's loaded
   checkpoint goes first), then moves the lease `holder: me -> that entry's lease id`,
   then sends the entry's process a one-datagram hint (UDP on 127.0.0.1) naming the
   lease; that process wakes a caller at once, no database read. Two operations between
   one generation and the next instead of a polling interval.
2. Fast claim (the idle path). A caller that finds the queue empty claims a free up
   instance directly (preferring its checkpoint, else the one idle longest).
3. Claim by plan (everything else). One watcher thread per process reads the instances
   and the queue (on a local event, on a hint, and every `poll_s`), computes the same
   greedy FIFO plan every process computes (`plan_assignment`) and claims the free
   instances planned for its own entries. The same scan delivers leases whose hint was
   lost (or came from another host), frees ones given to callers that gave up, renews
   leases and queue entries, and probes down instances.

So a free instance goes to the longest waiter across all processes and hosts, an
instance runs at most one generation at a time, and a lease whose holder died expires
(`lease_s`; a handed-over lease starts short, `waiter_ttl_s`, until its new holder
renews it) and frees the instance. Hints are only hints: correctness comes from the
atomic updates, fairness from the shared tickets.

Health: a refused connection or a timeout marks an instance down at once; a 5xx or an
empty image counts a failure, two in a row mark it down. Down instances are probed
(`SDClient.ping`, claimed atomically so one process probes) with backoff 2 s, 4 s, ...
60 s and come back up when they answer. A failed generation is retried on another
instance (up to `max_attempts`); nothing waits forever: each call has a read timeout
and each wait `wait_timeout_s`.

Clocks: lease and expiry times are compared with each process's UTC clock, so hosts
sharing a pool need synchronised clocks (NTP); skew only shortens or lengthens leases.
"""

from __future__ import annotations

import io
import logging
import os
import random
import secrets
import select
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from PIL import Image
from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from agent.images import PlaceholderImageProvider, png_bytes
from agent.sd import (
    PROVIDER,
    SDClient,
    SDError,
    b64encode,
    build_payload,
    decode_first_image,
    decode_image_value,
    parse_info,
)
from agent.types import ImageRequest, ImageResult, ModelError, Segmentation

log = logging.getLogger(__name__)

T = TypeVar("T")

COUNTER_ID = "sd_waiters"
STATS_ID = "sd_pool"
DOWN_AT_ONCE = {"connect", "timeout"}
COUNTED = {"server", "empty"}
FAILURES_TO_DOWN = 2
MEMBERS_TTL_S = 10.0
MEMBERS_REFRESH_S = 0.5
SNAPSHOT_MAX_AGE_S = 1.0
WAKE = b"!"  # look at the queue and the instances
RENEW = b"r"  # just wake up (a new lease to renew)
HANDOFF = "H"
FINISHED_KEEP = 4096  # recently finished lease ids remembered, so a stale read never revives one


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: Any) -> datetime | None:
    """Datetimes from a client without tz_aware come back naive; they are UTC."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def checkpoint_key(name: str | None) -> str | None:
    """Compare checkpoints by name: `v1-5-pruned-emaonly.safetensors [6ce0161689]` == `v1-5-pruned-emaonly`."""
    if not name:
        return None
    key = name.strip().split(" [", 1)[0].replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt", ".pt"):
        if key.lower().endswith(ext):
            key = key[: -len(ext)]
    return key.lower() or None


def _entry_of(lease_id: str) -> str:
    """Lease ids given to a queue entry are `<entry id>#<n>`; fast-claim leases are their own entry."""
    return lease_id.split("#", 1)[0]


def _want(doc: dict[str, Any]) -> int:
    if "want" in doc:
        return max(0, int(doc.get("want") or 0))
    return 0 if doc.get("assigned") else 1  # a plain one-caller entry


def ensure_pool_indexes(db: Database) -> None:
    """Idempotent; called by every pool at construction."""
    db.sd_waiters.create_index([("ticket", ASCENDING)])
    db.sd_waiters.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)
    db.sd_instances.create_index([("state", ASCENDING)])
    db.sd_pool_members.create_index([("expires_at", ASCENDING)], expireAfterSeconds=0)


class _Waker:
    """Wakes one process's watcher: from its own threads, or by a datagram from another process on this host.

    A UDP socket on 127.0.0.1 (never reachable from other hosts). A datagram is either
    "look again" or "lease L on instance U is yours"; the latter is checked against local
    state before use, so a stray or forged datagram costs at most one extra look.
    """

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]

    def send(self, port: int, message: bytes = WAKE) -> None:
        try:
            self.sock.sendto(message, ("127.0.0.1", port))
        except OSError:
            pass  # buffer full (wake-ups already pending) or the peer is gone: polling covers it

    def wake(self, message: bytes = WAKE) -> None:
        self.send(self.port, message)

    def wait(self, timeout: float) -> list[bytes]:
        try:
            ready, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        except (OSError, ValueError):  # closed
            time.sleep(min(max(timeout, 0.0), 0.05))
            return []
        messages: list[bytes] = []
        while ready:
            try:
                messages.append(self.sock.recv(2048))
            except OSError:
                break
        return messages

    def close(self) -> None:
        self.sock.close()


@dataclass
class Lease:
    """The right to run one call on one instance, until released (or `lease_until` passes)."""

    id: str
    url: str
    ticket: int
    checkpoint: str | None = None  # what the instance had loaded when claimed (None after a hand-over)
    wait_ms: float = 0.0


@dataclass
class RunInfo:
    instance: str
    attempts: int
    wait_ms: float
    latency_ms: float
    errors: list[str] = field(default_factory=list)


class _Slot:
    """One waiting caller."""

    __slots__ = ("event", "lease")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lease: Lease | None = None


class _Entry:
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
        self.waiting: deque[_Slot] = deque()
        self.uncounted = 0  # callers that joined but are not yet in the document's `want`
        self.registered = False
        self.db_lock = threading.Lock()  # orders this entry's insert / $inc


def _acceptable(entry: dict[str, Any], url: str, up: set[str]) -> bool:
    """An entry avoids instances that failed it, unless every up instance did (a pool of one must retry)."""
    excluded = set(entry.get("exclude") or ())
    return url not in excluded or not (up - excluded)


def plan_assignment(
    waiters: Iterable[dict[str, Any]], instances: Iterable[dict[str, Any]], now: datetime
) -> list[tuple[str, str]]:
    """[(queue entry id, instance URL)]: who gets which free instance, oldest entry first.

    Pure and deterministic, so every process computes the same plan from the same snapshot
    and claims only for its own entries. An entry wanting n instances is served n times in
    a row. Each gets a free up instance that has its checkpoint loaded if there is one,
    else the one idle longest; it avoids the instances in its `exclude` unless every up
    instance is excluded.
    """
    docs = list(instances)
    up = {d["_id"] for d in docs if d.get("state", "up") == "up"}
    free = [
        d
        for d in docs
        if d["_id"] in up and (not d.get("holder") or (_aware(d.get("lease_until")) or now) < now)
    ]
    epoch = datetime.min.replace(tzinfo=UTC)
    free.sort(key=lambda d: (_aware(d.get("released_at")) or epoch, d["_id"]))
    plan: list[tuple[str, str]] = []
    for w in waiters:
        want = checkpoint_key(w.get("checkpoint"))
        for _ in range(_want(w)):
            if not free:
                return plan
            allowed = [d for d in free if _acceptable(w, d["_id"], up)]
            if not allowed:
                break  # an acceptable instance exists but is busy: wait for it
            pick = next(
                (d for d in allowed if want and checkpoint_key(d.get("checkpoint")) == want), allowed[0]
            )
            plan.append((w["_id"], pick["_id"]))
            free.remove(pick)
    return plan


def affinity_window(waiters: list[dict[str, Any]], checkpoint: str | None, up: int) -> int | None:
    """For a hand-over of an instance that has `checkpoint` loaded: the highest ticket an entry wanting that
    checkpoint may have to go before older entries, or None when no such entry is in the window.

    The window is the first round of waiting callers (as many as there are up instances):
    they are all about to be served anyway, so serving the one that wants this instance's
    checkpoint first saves a model switch and delays the others by at most one generation.
    """
    key = checkpoint_key(checkpoint)
    if not key:
        return None
    window: list[dict[str, Any]] = []
    for w in waiters:
        window += [w] * _want(w)
        if len(window) >= max(1, up):
            break
    window = window[: max(1, up)]
    if not window or not any(checkpoint_key(w.get("checkpoint")) == key for w in window):
        return None
    return int(window[-1]["ticket"])


class SDInstancePool:
    """Fair, cross-process, health-checked leasing of SD WebUI instances (see the module docstring)."""

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
        self.probe_max_s = probe_max_s
        self.ping_timeout_s = ping_timeout_s
        self.waiter_ttl_s = waiter_ttl_s
        self.join_window_s = join_window_s
        self.max_waiters_read = max_waiters_read
        self.handover = handover  # False: no hand-over, no datagrams: claims by polling only (for comparison)
        self.clients = {u: SDClient(u, timeout_s, ping_timeout_s=ping_timeout_s) for u in urls}
        self.hostname = socket.gethostname()
        self.process_id = self._new_process_id()
        self.max_queue_seen = 0  # deepest queue (waiting callers) this process's watcher observed
        self.handovers = 0  # instances this process handed straight to a waiting caller
        self.claims = 0  # instances this process claimed (fast or by plan)
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}  # our queue entries (registered or about to be)
        self._open: dict[
            tuple[Any, ...], _Entry
        ] = {}  # entries still accepting callers, by (checkpoint, exclude)
        self._leases: dict[str, Lease] = {}
        self._finished: deque[str] = deque(maxlen=FINISHED_KEEP)
        self._finished_set: set[str] = set()
        self._probing: set[str] = set()
        self._dead_entries: list[str] = []  # queue documents to delete
        self._peers: dict[str, int] = {}  # process id -> hint port, other pool processes on this host
        self._up: tuple[float, set[str]] = (0.0, set(urls))  # (monotonic time, up instances) last seen
        self._queue: tuple[float, list[dict[str, Any]]] = (0.0, [])  # (monotonic time, queue) last read
        self._seq = 0
        self._empty_at = -1e9  # when we last saw the queue empty (monotonic)
        self._waker: _Waker | None = None
        self._closed = threading.Event()
        self._stopping = threading.Event()  # shutdown: no new leases for this process's callers
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        ensure_pool_indexes(db)
        self._register_instances()

    def _new_process_id(self) -> str:
        return f"{self.hostname}:{os.getpid()}:{secrets.token_hex(3)}"

    def _next_id(self, kind: str) -> str:
        with self._lock:
            self._seq += 1
            return f"{self.process_id}:{kind}{self._seq}"

    # ------------------------------------------------------------------ setup
    def _register_instances(self) -> None:
        """Upsert our instances without touching a live lease or health state another worker wrote."""
        now = _now()
        try:  # create the ticket counter up front: racing first-ever upserts are where databases stumble
            self.db.counters.update_one({"_id": COUNTER_ID}, {"$setOnInsert": {"seq": 0}}, upsert=True)
        except DuplicateKeyError:
            pass
        for url in self.urls:
            self.db.sd_instances.update_one(
                {"_id": url},
                {
                    "$setOnInsert": {
                        "state": "up",
                        "holder": None,
                        "lease_until": None,
                        "checkpoint": None,
                        "ckey": None,
                        "failures": 0,
                        "probe_failures": 0,
                        "next_probe_at": None,
                        "last_error": None,
                        "served": 0,
                        "released_at": None,
                        "created_at": now,
                    }
                },
                upsert=True,
            )
        # a down instance left by an earlier run is probed soon rather than after its old backoff
        self.db.sd_instances.update_many(
            {
                "_id": {"$in": self.urls},
                "state": "down",
                "next_probe_at": {"$gt": now + timedelta(seconds=self.probe_base_s)},
            },
            {"$set": {"next_probe_at": now}},
        )

    def refresh_checkpoints(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Ask every instance which checkpoint it has loaded (for model affinity). Best effort."""
        found: dict[str, str | None] = {}

        def one(url: str) -> None:
            client = SDClient(url, timeout_s or self.ping_timeout_s)
            try:
                name = (client.options() or {}).get("sd_model_checkpoint")
            except SDError:
                return
            finally:
                client.close()
            found[url] = name
            if name:
                try:
                    self.db.sd_instances.update_one(
                        {"_id": url}, {"$set": {"checkpoint": name, "ckey": checkpoint_key(name)}}
                    )
                except PyMongoError as exc:
                    log.warning("could not store the checkpoint of %s: %s", url, exc)

        threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in self.urls]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return found

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
            self.db.sd_pool_members.delete_one({"_id": self.process_id})
        except PyMongoError as exc:
            log.warning(
                "SD pool: could not free this process's leases at close (they expire in %.0f s): %s",
                self.lease_s,
                exc,
            )
        for client in self.clients.values():
            client.close()

    def interrupt_held(self) -> int:
        """Shutdown: grant no new lease to this process's callers (they get a 503 ModelError) and ask every
        instance we hold to stop its generation now (the WebUI returns what it has, so the caller finishes,
        writes its record and releases the lease). Returns how many instances were asked."""
        self._stopping.set()
        with self._lock:
            urls = {lease.url for lease in self._leases.values() if lease.url}
            slots = [slot for entry in self._entries.values() for slot in entry.waiting]
        for slot in slots:
            slot.event.set()  # waiting callers look again and see the pool stopping
        for url in urls:
            try:
                self.clients[url].interrupt(timeout_s=self.ping_timeout_s)
            except (SDError, RuntimeError) as exc:
                log.warning("SD pool: could not interrupt %s at shutdown: %s", url, exc)
        return len(urls)

    def release_held(self) -> int:
        """Free the instances whose lease belongs to this process (held, or handed to one of our queue
        entries); a call still running on one is abandoned. Returns how many were freed."""
        prefix = self.process_id + ":"
        freed = 0
        for doc in self.db.sd_instances.find({"_id": {"$in": self.urls}}, {"holder": 1}):
            holder = doc.get("holder") or ""
            if holder.startswith(prefix):
                res = self.db.sd_instances.update_one(
                    {"_id": doc["_id"], "holder": holder},
                    {"$set": {"holder": None, "lease_until": None, "released_at": _now()}},
                )
                freed += res.modified_count
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
            for port in list(self._peers.values()):
                waker.send(port)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._pid != os.getpid():  # forked after use: threads and local state did not come along
                self._pid = os.getpid()
                self.process_id = self._new_process_id()
                self._entries.clear()
                self._open.clear()
                self._leases.clear()
                self._probing.clear()
                self._dead_entries.clear()
                self._peers = {}
                self._thread = None
                self._waker = None
            if self._waker is None:
                self._waker = _Waker()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="sd-pool-watcher", daemon=True)
                self._thread.start()

    # ------------------------------------------------------------------ leasing
    def acquire(
        self, checkpoint: str | None = None, exclude: Iterable[str] = (), timeout_s: float | None = None
    ) -> Lease:
        """Wait (FIFO across all processes) for a free up instance; raise ModelError(503) on timeout."""
        if self._closed.is_set() or self._stopping.is_set():
            raise self._stopping_error()
        timeout_s = self.wait_timeout_s if timeout_s is None else timeout_s
        start = time.monotonic()
        exclude = sorted(set(exclude))
        self._ensure_thread()
        lease = self._fast_claim(checkpoint, exclude)
        if lease is not None:
            lease.wait_ms = (time.monotonic() - start) * 1000
            return lease
        slot = _Slot()
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
        with self._lock:
            lease = slot.lease
            if lease is None and slot in entry.waiting:
                entry.waiting.remove(slot)
        if lease is not None:
            lease.wait_ms = (time.monotonic() - start) * 1000
            return lease
        self._give_up(entry)
        if self._stopping.is_set():
            raise self._stopping_error()
        raise self._timeout_error(timeout_s)

    def _stopping_error(self) -> ModelError:
        return ModelError(
            "the SD pool is closed: the server is shutting down", provider=PROVIDER, status=503, kind="image"
        )

    def _join(self, checkpoint: str | None, exclude: list[str], slot: _Slot) -> _Entry:
        """Add a waiting caller to the queue: to the entry this process opened for the same checkpoint a
        moment ago (the other images of the same request), else to a new entry with a new ticket."""
        key = (checkpoint_key(checkpoint), tuple(exclude))
        with self._lock:
            entry = self._open.get(key)
            if entry is None or time.monotonic() - entry.created > self.join_window_s:
                entry = _Entry(f"{self.process_id}:q{self._seq + 1}", checkpoint, exclude)
                self._seq += 1
                self._open[key] = entry
                self._entries[entry.id] = (
                    entry  # known before it exists in the database: a grant may follow at once
                )
            entry.waiting.append(slot)
            entry.uncounted += 1
        with entry.db_lock:
            with self._lock:
                count, entry.uncounted = entry.uncounted, 0
            if count:
                now = _now()
                if not entry.registered:
                    entry.ticket = self._ticket()
                    self.db.sd_waiters.insert_one(
                        {
                            "_id": entry.id,
                            "ticket": entry.ticket,
                            "want": count,
                            "granted": 0,
                            "checkpoint": checkpoint,
                            "ckey": checkpoint_key(checkpoint),
                            "exclude": exclude,
                            "process": self.process_id,
                            "enqueued_at": now,
                            "expires_at": now + timedelta(seconds=self.waiter_ttl_s),
                        }
                    )
                    entry.registered = True
                else:
                    self.db.sd_waiters.update_one({"_id": entry.id}, {"$inc": {"want": count}})
        self._notify()
        return entry

    def _give_up(self, entry: _Entry) -> None:
        """A caller timed out: take one unit of `want` back (if none is left, a lease is on its way to this
        entry; with nobody left to take it, it is freed when it arrives)."""
        try:
            self.db.sd_waiters.update_one({"_id": entry.id, "want": {"$gt": 0}}, {"$inc": {"want": -1}})
        except PyMongoError:
            pass  # the entry expires on its own
        self._notify(peers=True)  # we may have been first in line: the others can stop waiting for us

    def _fast_claim(self, checkpoint: str | None, exclude: list[str]) -> Lease | None:
        """Nobody waiting: take a free instance at once (one read, one atomic claim) instead of queueing.

        Only when the queue is empty, so it never overtakes a waiting caller (one that
        arrives between our read and our claim is a simultaneous arrival; the atomic claim
        decides). None: someone is waiting or nothing is free; join the queue.
        """
        candidates = [u for u in self.urls if u not in exclude]
        if not candidates:
            return None
        with self._lock:
            queueing = any(e.waiting for e in self._entries.values())
        seen_at, queue = self._queue
        if queueing or (time.monotonic() - seen_at < self.poll_s and any(_want(w) for w in queue)):
            return None  # there is a queue (ours, or one we just saw): no need to ask
        now = _now()
        # the other images of the same request (arriving within join_window_s) reuse one look at the queue
        if time.monotonic() - self._empty_at > self.join_window_s:
            try:
                if self.db.sd_waiters.find_one({"expires_at": {"$gt": now}, "want": {"$gt": 0}}, {"_id": 1}):
                    return None
            except PyMongoError:
                return None
            self._empty_at = time.monotonic()
        lease = Lease(id=self._next_id("f"), url="", ticket=0)
        with self._lock:
            self._leases[lease.id] = lease  # known locally before it exists in the database (orphan check)
        free = {
            "_id": {"$in": candidates},
            "state": "up",
            "$or": [{"holder": None}, {"lease_until": {"$lt": now}}],
        }
        update = {
            "$set": {
                "holder": lease.id,
                "lease_until": now + timedelta(seconds=self.lease_s),
                "leased_at": now,
            }
        }
        doc = None
        try:
            key = checkpoint_key(checkpoint)
            if key:  # model affinity first
                doc = self.db.sd_instances.find_one_and_update(
                    {**free, "ckey": key},
                    update,
                    sort=[("released_at", 1)],
                    projection={"holder": 1, "checkpoint": 1},
                )
            if doc is None:  # else the one idle longest
                doc = self.db.sd_instances.find_one_and_update(
                    free, update, sort=[("released_at", 1)], projection={"holder": 1, "checkpoint": 1}
                )
        except PyMongoError:
            doc = None
        if doc is None:
            with self._lock:
                self._leases.pop(lease.id, None)
            return None
        if doc.get("holder"):
            log.warning(
                "SD instance %s: the lease of %s ran out (holder died?); taking over",
                doc["_id"],
                doc["holder"],
            )
        lease.url = doc["_id"]
        lease.checkpoint = doc.get("checkpoint")
        self.claims += 1
        self._notify(look=False)  # the watcher renews the lease from now on
        return lease

    def _ticket(self) -> int:
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

    def _queue_length(self, now: datetime) -> int:
        return sum(_want(d) for d in self.db.sd_waiters.find({"expires_at": {"$gt": now}}, {"want": 1}))

    def _timeout_error(self, waited_s: float) -> ModelError:
        try:
            docs = list(self.db.sd_instances.find({"_id": {"$in": self.urls}}, {"state": 1, "last_error": 1}))
            queue = self._queue_length(_now())
        except PyMongoError:
            docs, queue = [], -1
        up = sum(1 for d in docs if d.get("state", "up") == "up")
        down = [f"{d['_id']} ({d.get('last_error') or 'down'})" for d in docs if d.get("state") == "down"]
        msg = (
            f"no Stable Diffusion instance became free within {waited_s:g} s: "
            f"{up} of {len(self.urls)} instances up, {max(queue, 0)} other callers waiting"
        )
        if down:
            msg += "; down: " + "; ".join(down)[:600]
        return ModelError(msg, provider=PROVIDER, status=503, retryable=True, kind="image")

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
        if ok and self.handover and self._hand_over(lease, checkpoint):
            return
        now = _now()
        release_set: dict[str, Any] = {"holder": None, "lease_until": None, "released_at": now}
        health_set: dict[str, Any] = {}
        inc: dict[str, int] = {}
        failure = error.failure if error is not None else None
        if ok:
            health_set = {"failures": 0}
            inc = {"served": 1}
            if checkpoint:
                health_set["checkpoint"] = checkpoint
                health_set["ckey"] = checkpoint_key(checkpoint)
        elif failure in DOWN_AT_ONCE:
            health_set = self._down_fields(now, error)
        elif failure in COUNTED:
            inc = {"failures": 1}
            health_set = {"last_error": _short(error)}
        update: dict[str, Any] = {"$set": {**release_set, **health_set}}
        if inc:
            update["$inc"] = inc
        try:
            doc = self.db.sd_instances.find_one_and_update(
                {"_id": lease.url, "holder": lease.id}, update, return_document=ReturnDocument.AFTER
            )
            if doc is None:  # our lease ran out and someone else holds it now: keep theirs, record health
                log.warning("lease %s on %s had expired before release", lease.id, lease.url)
                health_update: dict[str, Any] = {}
                if health_set:
                    health_update["$set"] = health_set
                if inc:
                    health_update["$inc"] = inc
                if health_update:
                    doc = self.db.sd_instances.find_one_and_update(
                        {"_id": lease.url}, health_update, return_document=ReturnDocument.AFTER
                    )
            if (
                failure in COUNTED
                and doc is not None
                and doc.get("state") == "up"
                and int(doc.get("failures") or 0) >= FAILURES_TO_DOWN
            ):
                self.db.sd_instances.update_one(
                    {"_id": lease.url, "state": "up"}, {"$set": self._down_fields(now, error)}
                )
        except PyMongoError as exc:
            log.error("could not release %s (it frees itself in %.0f s): %s", lease.url, self.lease_s, exc)
        self._notify(peers=True)
        if failure in DOWN_AT_ONCE or failure in COUNTED:
            log.warning("SD instance %s failed (%s): %s", lease.url, failure, error.message if error else "")

    def _hand_over(self, lease: Lease, checkpoint: str | None) -> bool:
        """Give the instance we hold straight to the oldest waiting caller (see the module docstring).

        False: nobody to give it to (or it could not be done); the caller then frees it the
        ordinary way and the scans take over.
        """
        url = lease.url
        loaded = checkpoint or lease.checkpoint
        try:
            now = _now()
            eligible = {"want": {"$gt": 0}, "expires_at": {"$gt": now}, "exclude": {"$ne": url}}
            take = {"$inc": {"want": -1, "granted": 1}}
            after = (
                ReturnDocument.AFTER
            )  # the embedded server's pre-images are not atomic; its post-images are
            doc = None
            bound = affinity_window(self._queue[1], loaded, len(self._up_instances()))
            if bound is not None:
                doc = self.db.sd_waiters.find_one_and_update(
                    {**eligible, "ckey": checkpoint_key(loaded), "ticket": {"$lte": bound}},
                    take,
                    sort=[("ticket", ASCENDING)],
                    projection={"granted": 1},
                    return_document=after,
                )
            if doc is None:
                doc = self.db.sd_waiters.find_one_and_update(
                    eligible,
                    take,
                    sort=[("ticket", ASCENDING)],
                    projection={"granted": 1},
                    return_document=after,
                )
            if doc is None:
                return False  # nobody waiting (or only callers this instance failed: the scans serve them)
            lease_id = f"{doc['_id']}#{int(doc['granted'])}"
            handed: dict[str, Any] = {
                "holder": lease_id,
                "released_at": now,
                "leased_at": now,
                "failures": 0,
                # short until the new holder renews it, in case its process just died
                "lease_until": now + timedelta(seconds=min(self.lease_s, self.waiter_ttl_s)),
            }
            if checkpoint:
                handed["checkpoint"] = checkpoint
                handed["ckey"] = checkpoint_key(checkpoint)
            if (
                self.db.sd_instances.find_one_and_update(
                    {"_id": url, "holder": lease.id},
                    {"$set": handed, "$inc": {"served": 1}},
                    projection={"_id": 1},
                )
                is None
            ):
                # we no longer held it (our lease ran out): give the caller its place back, free nothing
                self.db.sd_waiters.update_one({"_id": doc["_id"]}, {"$inc": {"want": 1}})
                return False
        except PyMongoError as exc:
            log.warning("SD pool hand-over of %s failed (%s); releasing it instead", url, exc)
            return False
        self.handovers += 1
        self._tell(lease_id, url)
        return True

    def _tell(self, lease_id: str, url: str) -> None:
        """Tell the entry's process that it now holds `url` under `lease_id` (its scan finds out anyway)."""
        process = _entry_of(lease_id).rsplit(":", 1)[0]
        if process == self.process_id:
            self._grant(lease_id, url)
            return
        port = self._peers.get(process)
        if port is None:  # a process that became active since our last look at the members
            try:
                doc = self.db.sd_pool_members.find_one({"_id": process, "host": self.hostname}, {"port": 1})
            except PyMongoError:
                doc = None
            if doc and doc.get("port"):
                port = int(doc["port"])
                self._peers = {**self._peers, process: port}
        waker = self._waker
        if port and waker is not None:
            waker.send(port, f"{HANDOFF}|{lease_id}|{url}".encode())

    def _grant(self, lease_id: str, url: str) -> None:
        """Our entry was given `url` under `lease_id`: wake its oldest waiting caller, or, if nobody waits
        any more, free the instance."""
        with self._lock:
            if lease_id in self._leases or lease_id in self._finished_set:
                return  # already delivered (hint and scan both saw it), or already done with
            entry = self._entries.get(_entry_of(lease_id))
            slot = entry.waiting.popleft() if entry is not None and entry.waiting else None
            if slot is not None:
                assert entry is not None
                slot.lease = Lease(id=lease_id, url=url, ticket=entry.ticket)
                self._leases[lease_id] = slot.lease
        if slot is not None:
            slot.event.set()
            self._notify(look=False)  # the watcher renews the lease from now on
        else:
            self._free_orphan(lease_id, url)

    def _free_orphan(self, holder: str, url: str) -> None:
        """An instance given to a caller of ours that is gone: put it back."""
        try:
            res = self.db.sd_instances.update_one(
                {"_id": url, "holder": holder},
                {"$set": {"holder": None, "lease_until": None, "released_at": _now()}},
            )
        except PyMongoError as exc:
            log.warning("could not free %s (it frees itself when the lease runs out): %s", url, exc)
            return
        if res.modified_count:
            self._notify(peers=True)

    def _down_fields(self, now: datetime, error: SDError | None) -> dict[str, Any]:
        return {
            "state": "down",
            "down_since": now,
            "probe_failures": 0,
            "next_probe_at": now + timedelta(seconds=self.probe_base_s),
            "last_error": _short(error),
        }

    def _backoff(self, probe_failures: int) -> float:
        return min(self.probe_max_s, self.probe_base_s * (2**probe_failures))

    def _up_instances(self) -> set[str]:
        seen_at, up = self._up
        if time.monotonic() - seen_at > SNAPSHOT_MAX_AGE_S:
            docs = self.db.sd_instances.find({"_id": {"$in": self.urls}}, {"state": 1})
            up = {d["_id"] for d in docs if d.get("state", "up") == "up"}
            self._up = (time.monotonic(), up)
        return up

    # ------------------------------------------------------------------ watcher thread
    def _loop(self) -> None:
        renew_every = max(0.05, min(self.lease_s, self.waiter_ttl_s) / 3)
        next_renew = next_members = next_scan = 0.0
        waker = self._waker
        assert waker is not None
        look = True
        while not self._closed.is_set():
            self._retire_entries()
            with self._lock:
                waiting = any(e.waiting for e in self._entries.values())
                holding = bool(self._leases)
            if not waiting and not holding:
                look = self._handle(waker.wait(1.0)) or look
                continue
            try:
                now = time.monotonic()
                if now >= next_members:
                    self._refresh_members(waker.port)
                    next_members = now + MEMBERS_REFRESH_S
                if now >= next_renew:
                    self._renew()
                    next_renew = now + renew_every
                if waiting and (look or now >= next_scan):
                    look = False
                    self._scan()
                    next_scan = time.monotonic() + self.poll_s * random.uniform(0.75, 1.25)
            except Exception as exc:  # noqa: BLE001 - the watcher must survive a database hiccup
                log.warning("SD pool watcher: %s", exc)
                look = False
                next_scan = time.monotonic() + self.poll_s
            deadline = min(next_scan, next_renew) if waiting else next_renew
            look = self._handle(waker.wait(deadline - time.monotonic())) or look

    def _retire_entries(self) -> None:
        """Delete the queue documents of entries whose callers are all served or gone and that no new
        caller can join any more (off everyone's critical path)."""
        now = time.monotonic()
        with self._lock:
            done = [
                e
                for e in self._entries.values()
                if not e.waiting and not e.uncounted and now - e.created > self.join_window_s
            ]
            for e in done:
                del self._entries[e.id]
                if self._open.get(e.key) is e:
                    del self._open[e.key]
        ids = [e.id for e in done if e.registered]
        if ids:
            try:
                self.db.sd_waiters.delete_many({"_id": {"$in": ids}})
            except PyMongoError:
                pass  # they expire on their own

    def _handle(self, messages: list[bytes]) -> bool:
        """Act on hand-over datagrams; True if any message asks for a look."""
        look = False
        for message in messages:
            if message.startswith(HANDOFF.encode() + b"|"):
                try:
                    _, lease_id, url = message.decode().split("|", 2)
                except ValueError:
                    continue
                if url in self.clients and lease_id.startswith(self.process_id + ":"):
                    self._grant(lease_id, url)
            elif message != RENEW:
                look = True
        return look

    def _refresh_members(self, port: int) -> None:
        """List ourselves as a pool process of this host (for hints) and learn the others' ports."""
        if not self.handover:
            return
        now = _now()
        self.db.sd_pool_members.update_one(
            {"_id": self.process_id},
            {
                "$set": {
                    "host": self.hostname,
                    "port": port,
                    "pid": os.getpid(),
                    "expires_at": now + timedelta(seconds=MEMBERS_TTL_S),
                }
            },
            upsert=True,
        )
        self._peers = {
            d["_id"]: int(d["port"])
            for d in self.db.sd_pool_members.find(
                {"host": self.hostname, "expires_at": {"$gt": now}, "_id": {"$ne": self.process_id}},
                {"port": 1},
            )
            if d.get("port")
        }

    def _renew(self) -> None:
        now = _now()
        with self._lock:
            leases = list(self._leases.values())
            entry_ids = [e.id for e in self._entries.values() if e.registered and e.waiting]
        leases = [lease for lease in leases if lease.url]
        if leases:
            res = self.db.sd_instances.update_many(
                {
                    "_id": {"$in": [lease.url for lease in leases]},
                    "holder": {"$in": [lease.id for lease in leases]},
                },
                {"$set": {"lease_until": now + timedelta(seconds=self.lease_s)}},
            )
            if res.matched_count < len(leases):
                log.debug(
                    "SD pool: %d of %d leases not renewed (released meanwhile, or expired)",
                    len(leases) - res.matched_count,
                    len(leases),
                )
        if entry_ids:
            self.db.sd_waiters.update_many(
                {"_id": {"$in": entry_ids}},
                {"$set": {"expires_at": now + timedelta(seconds=self.waiter_ttl_s)}},
            )

    def _read_queue(self, now: datetime) -> list[dict[str, Any]]:
        waiters = list(
            self.db.sd_waiters.find(
                {"expires_at": {"$gt": now}, "want": {"$gt": 0}},
                {"ticket": 1, "checkpoint": 1, "exclude": 1, "want": 1},
            )
            .sort("ticket", ASCENDING)
            .limit(self.max_waiters_read)
        )
        self._queue = (time.monotonic(), waiters)
        return waiters

    def _scan(self) -> None:
        now = _now()
        instances = list(self.db.sd_instances.find({"_id": {"$in": self.urls}}))
        self._up = (time.monotonic(), {d["_id"] for d in instances if d.get("state", "up") == "up"})
        prefix = self.process_id + ":"
        for doc in instances:
            holder = doc.get("holder") or ""
            if holder.startswith(prefix):
                with self._lock:
                    mine = holder in self._leases or holder in self._finished_set
                if not mine:  # given to us, but the hint was lost or never sent (or the caller is gone)
                    self._grant(holder, doc["_id"])
            if doc.get("state") == "down" and (_aware(doc.get("next_probe_at")) or now) <= now:
                self._start_probe(doc["_id"], now)
        waiters = self._read_queue(now)
        self._note_queue(sum(_want(w) for w in waiters))
        with self._lock:
            local = set(self._entries)
        for entry_id, url in plan_assignment(waiters, instances, now):
            if entry_id in local:
                self._claim(entry_id, url)

    def _note_queue(self, depth: int) -> None:
        if depth > self.max_queue_seen:
            self.max_queue_seen = depth
            try:
                self.db.counters.update_one({"_id": STATS_ID}, {"$max": {"max_queue": depth}}, upsert=True)
            except PyMongoError:
                pass

    def _claim(self, entry_id: str, url: str) -> None:
        """Take one of our entry's wanted instances off the queue, then the free instance planned for it."""
        now = _now()
        doc = self.db.sd_waiters.find_one_and_update(
            {"_id": entry_id, "want": {"$gt": 0}},
            {"$inc": {"want": -1, "granted": 1}},
            projection={"granted": 1},
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:
            return  # it was just handed an instance (the hint or the next scan delivers it)
        lease_id = f"{entry_id}#{int(doc['granted'])}"  # numbered by the post-image: unique per entry
        got = self.db.sd_instances.find_one_and_update(
            {"_id": url, "state": "up", "$or": [{"holder": None}, {"lease_until": {"$lt": now}}]},
            {
                "$set": {
                    "holder": lease_id,
                    "lease_until": now + timedelta(seconds=self.lease_s),
                    "leased_at": now,
                }
            },
            projection={"holder": 1, "checkpoint": 1},
        )
        if got is None:  # someone else got it first: give the place back; the next scan re-plans
            self.db.sd_waiters.update_one({"_id": entry_id}, {"$inc": {"want": 1}})
            return
        if got.get("holder"):
            log.warning(
                "SD instance %s: the lease of %s ran out (holder died?); taking over", url, got["holder"]
            )
        self.claims += 1
        self._grant(lease_id, url)
        with self._lock:
            lease = self._leases.get(lease_id)
            if lease is not None:
                lease.checkpoint = got.get("checkpoint")

    def _start_probe(self, url: str, now: datetime) -> None:
        with self._lock:
            if url in self._probing:
                return
        # claim the probe: push next_probe_at past the probe's timeout so other processes skip it
        doc = self.db.sd_instances.find_one_and_update(
            {"_id": url, "state": "down", "$or": [{"next_probe_at": None}, {"next_probe_at": {"$lte": now}}]},
            {
                "$set": {
                    "next_probe_at": now + timedelta(seconds=self.ping_timeout_s + 5.0),
                    "probing": self.process_id,
                }
            },
            projection={"probe_failures": 1},
        )
        if doc is None:
            return
        with self._lock:
            self._probing.add(url)
        threading.Thread(
            target=self._probe,
            args=(url, int(doc.get("probe_failures") or 0)),
            name="sd-pool-probe",
            daemon=True,
        ).start()

    def _probe(self, url: str, probe_failures: int) -> None:
        try:
            ok = self.clients[url].ping(self.ping_timeout_s)
            now = _now()
            if ok:
                self.db.sd_instances.update_one(
                    {"_id": url, "state": "down"},
                    {
                        "$set": {
                            "state": "up",
                            "failures": 0,
                            "probe_failures": 0,
                            "next_probe_at": None,
                            "up_since": now,
                            "probing": None,
                        }
                    },
                )
                log.info("SD instance %s answers again: back in the pool", url)
            else:
                self.db.sd_instances.update_one(
                    {"_id": url, "state": "down"},
                    {
                        "$set": {
                            "next_probe_at": now + timedelta(seconds=self._backoff(probe_failures + 1)),
                            "probe_failures": probe_failures + 1,
                            "probing": None,
                        }
                    },
                )
        except Exception as exc:  # noqa: BLE001 - a probe must never kill anything
            log.warning("probe of %s failed: %s", url, exc)
        finally:
            with self._lock:
                self._probing.discard(url)
            self._notify(peers=True)

    # ------------------------------------------------------------------ running calls
    def run(
        self,
        call: Callable[[SDClient], tuple[T, str | None]],
        *,
        checkpoint: str | None = None,
        what: str = "image generation",
    ) -> tuple[T, RunInfo]:
        """Run `call(client)` on a leased instance, retrying on another instance when it fails.

        `call` returns (value, checkpoint now loaded or None) and raises SDError on failure.
        """
        start = time.monotonic()
        exclude: list[str] = []
        errors: list[str] = []
        wait_ms = 0.0
        attempts = 0
        while attempts < self.max_attempts:
            avoid = exclude
            if exclude:
                try:
                    if not self._up_instances() - set(exclude):
                        avoid = []  # every up instance failed this call: retry on any rather than wait
                except PyMongoError:
                    pass
            try:
                lease = self.acquire(checkpoint, avoid)
            except ModelError as exc:
                if errors:
                    exc.message = f"{exc.message} (after {attempts} failed attempts: {'; '.join(errors)})"
                    exc.args = (exc.message,)
                raise
            if self._stopping.is_set():  # handed to us after shutdown began: free it, start nothing new
                self.release(lease, ok=False)
                raise self._stopping_error()
            attempts += 1
            wait_ms += lease.wait_ms
            try:
                value, loaded = call(self.clients[lease.url])
            except SDError as exc:
                self.release(lease, ok=False, error=exc)
                if exc.failure == "timeout":
                    self._interrupt_later(lease.url)
                errors.append(f"{lease.url}: {exc.message}")
                if not exc.retryable:
                    raise
                if lease.url not in exclude:
                    exclude.append(lease.url)
                continue
            except BaseException:
                self.release(lease, ok=False)
                raise
            self.release(lease, ok=True, checkpoint=loaded or checkpoint)
            return value, RunInfo(
                instance=lease.url,
                attempts=attempts,
                wait_ms=wait_ms,
                latency_ms=(time.monotonic() - start) * 1000,
                errors=errors,
            )
        raise ModelError(
            f"{what} failed on {attempts} attempts: " + "; ".join(errors),
            provider=PROVIDER,
            status=502,
            retryable=True,
            kind="image",
        )

    def _interrupt_later(self, url: str) -> None:
        """A timed-out generation may still be running on the GPU; ask the WebUI to stop it (best effort)."""

        def go() -> None:
            try:
                self.clients[url].interrupt(timeout_s=self.ping_timeout_s)
            except (SDError, RuntimeError):
                pass

        threading.Thread(target=go, name="sd-interrupt", daemon=True).start()

    # ------------------------------------------------------------------ status
    def health(self) -> dict[str, Any]:
        """From the shared collections only (no call to any instance)."""
        now = _now()
        docs = {d["_id"]: d for d in self.db.sd_instances.find({"_id": {"$in": self.urls}})}
        queue = self._queue_length(now)
        rows = []
        for url in self.urls:
            d = docs.get(url, {})
            lease_until = _aware(d.get("lease_until"))
            busy = bool(d.get("holder")) and lease_until is not None and lease_until > now
            rows.append(
                {
                    "url": url,
                    "state": d.get("state", "up"),
                    "busy": busy,
                    "checkpoint": d.get("checkpoint"),
                    "failures": int(d.get("failures") or 0),
                    "served": int(d.get("served") or 0),
                    "last_error": d.get("last_error"),
                    "next_probe_at": _iso(d.get("next_probe_at")),
                }
            )
        up = sum(1 for r in rows if r["state"] == "up")
        busy = sum(1 for r in rows if r["state"] == "up" and r["busy"])
        return {
            "ok": up > 0,
            "provider": PROVIDER,
            "instances": rows,
            "up": up,
            "down": len(rows) - up,
            "busy": busy,
            "free": up - busy,
            "queue": queue,
        }

    def answering(self, timeout_s: float | None = None) -> dict[str, bool]:
        """Which instances answer the pool's own probe (`SDClient.ping`) now; all pinged at once.

        For /health: the shared state says what the pool last saw (an instance nobody used yet is
        "up" whether or not anything listens), this says whether an image request could be served.
        Changes no state: leases and down/up marks stay the pool's business.
        """
        wait_s = timeout_s or self.ping_timeout_s
        found: dict[str, bool] = {}

        def one(url: str) -> None:
            found[url] = self.clients[url].ping(wait_s)

        threads = [threading.Thread(target=one, args=(u,), name="sd-health", daemon=True) for u in self.urls]
        for t in threads:
            t.start()
        deadline = time.monotonic() + wait_s + 1.0
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        return {u: found.get(u, False) for u in self.urls}

    def stats(self) -> dict[str, Any]:
        docs = {
            d["_id"]: d
            for d in self.db.sd_instances.find(
                {"_id": {"$in": self.urls}}, {"served": 1, "state": 1, "checkpoint": 1}
            )
        }
        counters = self.db.counters.find_one({"_id": STATS_ID}) or {}
        served = {u: int((docs.get(u) or {}).get("served") or 0) for u in self.urls}
        total = sum(served.values())
        return {
            "served": served,
            "share": {u: (n / total if total else 0.0) for u, n in served.items()},
            "total_served": total,
            "max_queue": int(counters.get("max_queue") or 0),
            "max_queue_this_process": self.max_queue_seen,
            "handovers_this_process": self.handovers,
            "claims_this_process": self.claims,
        }


def _short(error: SDError | None) -> str | None:
    return error.message[:300] if error is not None else None


def _iso(value: Any) -> str | None:
    dt = _aware(value)
    return dt.isoformat() if dt else None


def _flatten_on_white(png: bytes) -> bytes:
    """SAM cut-outs can be transparent outside the object; the apps want it on white (as the original)."""
    with Image.open(io.BytesIO(png)) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return png_bytes(Image.alpha_composite(white, rgba).convert("RGB"))


def _as_mask(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as img:
        return png_bytes(img.convert("L"))


class SDPoolProvider:
    """ImageProvider over the shared SD WebUI pool: txt2img/img2img with ControlNet, SAM cut-outs."""

    name = PROVIDER

    def __init__(
        self, pool: SDInstancePool, *, sam_enabled: bool = False, max_workers: int = 16, max_side: int = 4096
    ) -> None:
        self.pool = pool
        self.sam_enabled = sam_enabled
        self.max_workers = max_workers
        self._fallback = PlaceholderImageProvider(max_side=max_side)

    @classmethod
    def from_settings(
        cls, settings: Any, db: Database | None, *, refresh_checkpoints: bool = True, **pool_kwargs: Any
    ) -> SDPoolProvider:
        if db is None:
            raise ValueError("IMAGE_PROVIDER=sdwebui needs MongoDB: the pool shares its instances through it")
        pool = SDInstancePool(
            db,
            list(settings.SD_INSTANCES),
            timeout_s=settings.SD_TIMEOUT_S,
            wait_timeout_s=settings.SD_WAIT_TIMEOUT_S,
            lease_s=settings.SD_LEASE_S,
            max_attempts=settings.SD_MAX_ATTEMPTS,
            **pool_kwargs,
        )
        if refresh_checkpoints:  # learn which checkpoint each instance has loaded, without delaying start-up
            threading.Thread(target=pool.refresh_checkpoints, name="sd-checkpoints", daemon=True).start()
        return cls(pool, sam_enabled=settings.SD_SAM_ENABLED, max_side=settings.MAX_IMAGE_SIDE)

    def generate(self, request: ImageRequest) -> ImageResult:
        endpoint, payload = build_payload(request)

        def call(client: SDClient) -> tuple[tuple[bytes, dict[str, Any]], str | None]:
            response = client.post(endpoint, payload)
            png = decode_first_image(response, client.base_url)
            info = parse_info(response)
            return (png, info), info.get("sd_model_checkpoint") or request.checkpoint

        (png, info), run = self.pool.run(call, checkpoint=request.checkpoint)
        seed = info.get("seed")
        return ImageResult(
            png=png,
            provider=self.name,
            instance=run.instance,
            seed=seed if isinstance(seed, int) else request.seed,
            latency_ms=run.latency_ms,
            wait_ms=run.wait_ms,
            attempts=run.attempts,
            info={
                "endpoint": endpoint,
                "checkpoint": info.get("sd_model_checkpoint") or request.checkpoint,
                "errors": run.errors,
            },
        )

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        """All at once: the pool hands them out as instances free up; results in request order."""
        if not requests:
            return []
        if len(requests) == 1:
            return [self.generate(requests[0])]
        with ThreadPoolExecutor(
            max_workers=min(self.max_workers, len(requests)), thread_name_prefix="sd"
        ) as ex:
            futures = [ex.submit(self.generate, r) for r in requests]
            return [f.result() for f in futures]

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        """Cut the object named `text_prompt` out with the WebUI's segment-anything extension (+ GroundingDINO).

        With SD_SAM_ENABLED off, the placeholder's threshold cut-out is used and its provider
        name says so.
        """
        if not self.sam_enabled:
            seg = self._fallback.segment(image, text_prompt)
            seg.provider = "placeholder-threshold (SD_SAM_ENABLED is off)"
            return seg
        payload = {
            "input_image": b64encode(image),
            "dino_enabled": True,
            "dino_text_prompt": text_prompt,
            "dino_preview_checkbox": False,
        }

        def call(client: SDClient) -> tuple[Segmentation, None]:
            response = client.sam_predict(payload)
            masks = response.get("masks") or []
            cutouts = response.get("masked_images") or []
            if not masks or not cutouts:
                raise SDError(
                    f"segment-anything found no {text_prompt!r} in the image: {response.get('msg')}",
                    failure="client",
                    instance=client.base_url,
                    retryable=False,
                )
            i = 1 if len(masks) > 1 and len(cutouts) > 1 else 0  # the original used the second candidate
            mask = decode_image_value(masks[i], instance=client.base_url, what="mask")
            cutout = decode_image_value(cutouts[i], instance=client.base_url, what="cut-out")
            return Segmentation(
                mask=_as_mask(mask), cutout=_flatten_on_white(cutout), provider="sdwebui-sam"
            ), None

        seg, _ = self.pool.run(call, what="segmentation")
        return seg

    def health(self) -> dict[str, Any]:
        """The pool's shared view plus a ping of every instance: ok when at least one answers."""
        answers = self.pool.answering()
        try:
            out = self.pool.health()
        except PyMongoError as exc:
            out = {
                "ok": False,
                "provider": self.name,
                "error": f"database: {exc}",
                "instances": [{"url": u} for u in self.pool.urls],
            }
        for row in out["instances"]:
            row["answers"] = answers.get(row["url"], False)
        out["answering"] = sum(answers.values())
        out["sam"] = self.sam_enabled
        if "error" in out:  # the shared state cannot be read: no lease can be taken either
            return out
        # an answering instance the pool still marks down rejoins at its next probe; callers wait for it
        out["ok"] = out["answering"] > 0
        if not out["ok"]:
            out["error"] = (
                f"no SD instance answers GET /sdapi/v1/progress within {self.pool.ping_timeout_s:g} s: "
                + ", ".join(self.pool.urls)
            )
        return out

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    def interrupt_held(self) -> int:
        return self.pool.interrupt_held()

    def close(self) -> None:
        self.pool.close()
