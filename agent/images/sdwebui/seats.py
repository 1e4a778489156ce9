"""Seats: an SD instance runs one generation and holds the next one queued (`SD_QUEUE_DEPTH`).

Why: with one lease per instance, the instance idles between one image and the next while
the finished caller hands its lease over (MongoDB commands), the next caller wakes up and its
HTTP request arrives: tens of milliseconds per image, far more with fast samplers. The WebUI
itself runs one generation at a time and queues the next (its queue lock), so with depth 2
each instance has two lease *seats*: a caller granted the second seat of a busy instance
sends its request at once, the WebUI starts it the moment the running one ends (no gap),
and the hand-over of the freed seat happens off the critical path, while a whole generation
runs. Never more than one waits behind the running one (that was the originals' bug).

Both seats live in the instance's one document, so every claim, hand-over and release stays
one atomic single-document update and can test the other seat in the same filter ("claim
seat 0 only if seat 1 is free too" is how a fully idle instance goes before a busy one's
second seat). Seat 0 is `holder` / `lease_until` / `leased_at` (the depth-1 shape, unchanged);
seat 1 is `holder_1` / `lease_until_1` / `leased_at_1`. Health (`state`, `failures`, probes)
and the loaded `checkpoint` are per instance and apply to both seats.

A caller on a seat whose other seat was busy at grant time (`Lease.queued`) waits for the
running image too: its read timeout is doubled, so nothing fails early and a hung instance
is still detected. Depth 1 is exactly the one-deep pool (seat 1 is never used).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

from agent.leases import lease_until, renew_leases

MAX_DEPTH = 2
HOLDER = ("holder", "holder_1")
UNTIL = ("lease_until", "lease_until_1")
LEASED_AT = ("leased_at", "leased_at_1")
FIELDS = {f: 1 for f in HOLDER + UNTIL + LEASED_AT}  # a projection with every seat's lease


def aware(value: Any) -> datetime | None:
    """Datetimes from a client without tz_aware come back naive; they are UTC."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def clamp_depth(depth: int) -> int:
    return max(1, min(MAX_DEPTH, int(depth)))


# ---- filters (MongoDB)
def free_filter(seat: int, now: datetime) -> dict[str, Any]:
    """Nobody holds the seat, or its holder's lease ran out (the holder died)."""
    return {"$or": [{HOLDER[seat]: None}, {UNTIL[seat]: {"$lt": now}}]}


def idle_filter(depth: int, now: datetime) -> dict[str, Any]:
    """Every seat free: the instance runs nothing of ours."""
    if depth == 1:
        return free_filter(0, now)
    return {"$and": [free_filter(s, now) for s in range(depth)]}


# ---- updates
def lease_set(seat: int, holder: str, ttl_s: float, now: datetime) -> dict[str, Any]:
    return {HOLDER[seat]: holder, UNTIL[seat]: lease_until(ttl_s, now), LEASED_AT[seat]: now}


def freed_set(seat: int, now: datetime) -> dict[str, Any]:
    return {HOLDER[seat]: None, UNTIL[seat]: None, "released_at": now}


# ---- reading a document
def live(doc: dict[str, Any], seat: int, now: datetime) -> bool:
    """The seat is held by a lease that has not run out."""
    return bool(doc.get(HOLDER[seat])) and (aware(doc.get(UNTIL[seat])) or now) >= now


def busy_seats(doc: dict[str, Any], now: datetime, depth: int) -> list[int]:
    return [s for s in range(depth) if live(doc, s, now)]


def other_busy(doc: dict[str, Any] | None, seat: int, now: datetime, depth: int) -> bool:
    """Another seat of the instance was held (by the document `doc`): the caller on `seat` queues behind it."""
    return doc is not None and any(live(doc, s, now) for s in range(depth) if s != seat)


def holders(doc: dict[str, Any]) -> list[tuple[int, str]]:
    """(seat, lease id) of every held seat (live or run out), whatever the depth."""
    return [(s, doc[f]) for s, f in enumerate(HOLDER) if doc.get(f)]


def running_since(doc: dict[str, Any], now: datetime, depth: int) -> datetime:
    """When the oldest live lease on the instance was taken (its generation ends first)."""
    times = [aware(doc.get(LEASED_AT[s])) or now for s in busy_seats(doc, now, depth)]
    return min(times) if times else now


# ---- database
def renew(db: Database, leases: Iterable[tuple[str, str, int]], ttl_s: float, now: datetime) -> int:
    """Push out the leases [(url, lease id, seat)] still ours (one update per seat used); how many matched."""
    by_seat: dict[int, tuple[set[str], set[str]]] = {}
    for url, lease_id, seat in leases:
        urls, ids = by_seat.setdefault(seat, (set(), set()))
        urls.add(url)
        ids.add(lease_id)
    return sum(
        renew_leases(
            db.sd_instances,
            sorted(urls),
            field=HOLDER[seat],
            values=sorted(ids),
            ttl_s=ttl_s,
            now=now,
            until_field=UNTIL[seat],
        )
        for seat, (urls, ids) in by_seat.items()
    )


def ours_running(db: Database, urls: Iterable[str], prefix: str, now: datetime) -> list[str]:
    """Of `urls`, the instances whose every live lease belongs to this process (`prefix`): whatever runs
    there is ours, so `/sdapi/v1/interrupt` stops nobody else's generation."""
    found = []
    for doc in db.sd_instances.find({"_id": {"$in": sorted(set(urls))}}, FIELDS):
        seats = busy_seats(doc, now, MAX_DEPTH)
        if seats and all(str(doc[HOLDER[s]]).startswith(prefix) for s in seats):
            found.append(doc["_id"])
    return found
