"""Hand-over (the busy path): a finished caller gives its instance straight to the queue's oldest entry.

`find_one_and_update({want > 0, not excluding this instance}, {want -1, granted +1}, sort by
ticket)` (within the first round of entries, as many as there are instances, one that wants
this instance's loaded checkpoint goes first), then the lease of our seat moves `holder: me
-> that entry's lease id` (only while the instance is up), then the entry's process gets a
one-datagram hint (UDP on 127.0.0.1) naming the lease and seat; that process wakes a caller
at once, no database read. Two operations between one generation and the next instead of a
polling interval; with depth 2 (`seats.py`) not even those, as the other seat's caller has
its request queued in the WebUI already and this hand-over happens while it runs. Hints are
only hints: a lost one is found by the next scan.

`sd_pool_members` lists the pool processes of each host with their wake-up port.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

from pymongo import ASCENDING, ReturnDocument
from pymongo.database import Database
from pymongo.errors import PyMongoError

from agent.images.sdwebui import seats
from agent.images.sdwebui.planner import affinity_window, checkpoint_key
from agent.images.sdwebui.queue import Lease
from agent.leases import lease_until, utcnow

log = logging.getLogger(__name__)

WAKE = b"!"  # look at the queue and the instances
RENEW = b"r"  # just wake up (a new lease to renew)
HANDOFF = "H"
MEMBERS_TTL_S = 10.0
# Two commands per refresh and process, while it waits or holds a lease. A peer that became active since
# our last refresh is looked up when we have a hint for it (`Members.port_of`); until our next refresh
# it only misses our "look again" wake-ups, and its own scan every poll_s covers those.
MEMBERS_REFRESH_S = MEMBERS_TTL_S / 3


@dataclass(frozen=True)
class Grant:
    """A seat of an instance given to one of a process's queue entries under `lease_id`."""

    lease_id: str
    url: str
    seat: int = 0
    queued: bool = False  # another seat was busy at grant time


class Waker:
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

    def hint(self, port: int, grant: Grant) -> None:
        """Tell the process listening on `port` that it now holds a seat of an instance (`grant`)."""
        self.send(port, f"{HANDOFF}|{grant.lease_id}|{grant.url}|{grant.seat}|{int(grant.queued)}".encode())

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


def read_messages(messages: list[bytes], process_id: str, urls: Container[str]) -> tuple[list[Grant], bool]:
    """(the grants handed to this process, whether any message asks for a look). A hint we cannot read
    asks for a look: the scan finds the lease in the database."""
    grants: list[Grant] = []
    look = False
    for message in messages:
        if message.startswith(HANDOFF.encode() + b"|"):
            parts = message.decode(errors="replace").split("|")
            if len(parts) == 5 and parts[3] in ("0", "1") and parts[4] in ("0", "1"):
                _, lease_id, url, seat, queued = parts
                if url in urls and lease_id.startswith(process_id + ":"):
                    grants.append(Grant(lease_id, url, int(seat), queued == "1"))
                    continue
            look = True
        elif message != RENEW:
            look = True
    return grants, look


class Members:
    """`sd_pool_members`: this host's pool processes and their wake-up ports (for hints)."""

    def __init__(self, db: Database, hostname: str) -> None:
        self.db = db
        self.hostname = hostname
        self.peers: dict[str, int] = {}  # process id -> hint port, other pool processes on this host

    def refresh(self, process_id: str, port: int) -> None:
        """List ourselves as a pool process of this host and learn the others' ports."""
        now = utcnow()
        self.db.sd_pool_members.update_one(
            {"_id": process_id},
            {
                "$set": {
                    "host": self.hostname,
                    "port": port,
                    "pid": os.getpid(),
                    "expires_at": lease_until(MEMBERS_TTL_S, now),
                }
            },
            upsert=True,
        )
        self.peers = {
            d["_id"]: int(d["port"])
            for d in self.db.sd_pool_members.find(
                {"host": self.hostname, "expires_at": {"$gt": now}, "_id": {"$ne": process_id}},
                {"port": 1},
            )
            if d.get("port")
        }

    def port_of(self, process: str) -> int | None:
        """The hint port of another process on this host (None: not on this host, or not known)."""
        port = self.peers.get(process)
        if port is None:  # a process that became active since our last look at the members
            try:
                doc = self.db.sd_pool_members.find_one({"_id": process, "host": self.hostname}, {"port": 1})
            except PyMongoError:
                doc = None
            if doc and doc.get("port"):
                port = int(doc["port"])
                self.peers = {**self.peers, process: port}
        return port

    def leave(self, process_id: str) -> None:
        self.db.sd_pool_members.delete_one({"_id": process_id})


def hand_over(
    db: Database,
    lease: Lease,
    checkpoint: str | None,
    *,
    queue: list[dict[str, Any]],
    up: Callable[[], set[str]],
    lease_s: float,
    waiter_ttl_s: float,
    depth: int = 1,
) -> Grant | None:
    """Give the seat we hold straight to the oldest waiting caller; what it now holds.

    `queue` is the last queue this process read (for the affinity window), `up` the up
    instances. None: nobody to give it to (or it could not be done); the caller then frees
    it the ordinary way and the scans take over.
    """
    url = lease.url
    loaded = checkpoint or lease.checkpoint
    try:
        now = utcnow()
        eligible = {"want": {"$gt": 0}, "expires_at": {"$gt": now}, "exclude": {"$ne": url}}
        take = {"$inc": {"want": -1, "granted": 1}}
        after = ReturnDocument.AFTER  # the embedded server's pre-images are not atomic; its post-images are
        doc = None
        bound = affinity_window(queue, loaded, len(up()))
        if bound is not None:
            doc = db.sd_waiters.find_one_and_update(
                {**eligible, "ckey": checkpoint_key(loaded), "ticket": {"$lte": bound}},
                take,
                sort=[("ticket", ASCENDING)],
                projection={"granted": 1},
                return_document=after,
            )
        if doc is None:
            doc = db.sd_waiters.find_one_and_update(
                eligible,
                take,
                sort=[("ticket", ASCENDING)],
                projection={"granted": 1},
                return_document=after,
            )
        if doc is None:
            return None  # nobody waiting (or only callers this instance failed: the scans serve them)
        lease_id = f"{doc['_id']}#{int(doc['granted'])}"
        handed: dict[str, Any] = {
            # short until the new holder renews it, in case its process just died
            **seats.lease_set(lease.seat, lease_id, min(lease_s, waiter_ttl_s), now),
            "released_at": now,
            "failures": 0,
        }
        if checkpoint:
            handed["checkpoint"] = checkpoint
            handed["ckey"] = checkpoint_key(checkpoint)
        before = db.sd_instances.find_one_and_update(
            {"_id": url, seats.HOLDER[lease.seat]: lease.id, "state": "up"},
            {"$set": handed, "$inc": {"served": 1}},
            projection=seats.FIELDS,
        )
        if before is None:
            # we no longer held it (our lease ran out), or it went down meanwhile (its other seat's call
            # failed): give the caller its place back; the caller releases it the ordinary way
            db.sd_waiters.update_one({"_id": doc["_id"]}, {"$inc": {"want": 1}})
            return None
    except PyMongoError as exc:
        log.warning("SD pool hand-over of %s failed (%s); releasing it instead", url, exc)
        return None
    return Grant(lease_id, url, lease.seat, seats.other_busy(before, lease.seat, now, depth))
