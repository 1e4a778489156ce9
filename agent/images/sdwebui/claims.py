"""Taking a free seat of an instance in `sd_instances`: the fast claim (idle path) and the claim by plan.

Each claim is one atomic `find_one_and_update` on a document that is up and whose seat is
free (nobody holds it, or its holder's lease ran out; see `seats.py`); a claim of a fully
idle instance also requires its other seats free, in the same filter. The images of one
request on an idle pool are claimed together (`claim_idle_many`): one read, then one write
command carrying a conditional single-document update per instance. Taking over a dead
holder's lease is logged.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from pymongo import ReturnDocument, UpdateOne
from pymongo.database import Database

from agent.images.sdwebui import seats
from agent.images.sdwebui.planner import Pick, checkpoint_key, plan_seats

log = logging.getLogger(__name__)

# the previous holders (for the log and `Lease.queued`) and the loaded checkpoint
_CLAIMED = {**seats.FIELDS, "checkpoint": 1}
_EPOCH = datetime.min.replace(tzinfo=UTC)


def _took_over(url: str, doc: dict[str, Any], seat: int) -> None:
    holder = doc.get(seats.HOLDER[seat])
    if holder:
        log.warning("SD instance %s: the lease of %s ran out (holder died?); taking over", url, holder)


def claim_free(
    db: Database,
    candidates: list[str],
    holder: str,
    checkpoint: str | None,
    lease_s: float,
    now: datetime,
    depth: int = 1,
) -> tuple[dict[str, Any], int] | None:
    """Lease a seat of one up instance of `candidates` to `holder`: a fully idle instance first (one with
    `checkpoint` loaded if there is one, else the one idle longest), else (depth 2) the second seat of a
    busy one as the plan would pick it. (the instance's document before the claim, seat), or None when
    no seat is free. Raises PyMongoError."""
    free = {"_id": {"$in": candidates}, "state": "up", **seats.idle_filter(depth, now)}
    update = {"$set": seats.lease_set(0, holder, lease_s, now)}
    doc = None
    key = checkpoint_key(checkpoint)
    if key:  # model affinity first
        doc = db.sd_instances.find_one_and_update(
            {**free, "ckey": key}, update, sort=[("released_at", 1)], projection=_CLAIMED
        )
    if doc is None:  # else the one idle longest
        doc = db.sd_instances.find_one_and_update(
            free, update, sort=[("released_at", 1)], projection=_CLAIMED
        )
    if doc is not None:
        _took_over(doc["_id"], doc, 0)
        return doc, 0
    if depth < 2:
        return None
    # no idle instance: the second seat of a busy one (one read, one targeted claim; a lost race queues)
    docs = list(db.sd_instances.find({"_id": {"$in": candidates}}))
    me = {"_id": holder, "want": 1, "checkpoint": checkpoint}
    for pick in plan_seats([me], docs, now, depth):
        got = claim_seat(db, pick, holder, lease_s, now, depth)
        if got is not None:
            return got, pick.seat
    return None


def claim_idle_many(
    db: Database,
    candidates: list[str],
    holders: list[str],
    checkpoint: str | None,
    lease_s: float,
    now: datetime,
    depth: int = 1,
) -> list[tuple[dict[str, Any], str]]:
    """Lease seat 0 of up to len(holders) fully idle up instances of `candidates`, one holder each, in the
    order `claim_free` would take them (with `checkpoint` loaded first, then idle longest).

    Why: the images of one request used to claim one instance each, one find_one_and_update after
    another on one collection, so on an idle pool the last of four started about 10 ms after the
    first (20-40 ms with six); here it is one read and one write for all of them. Each update in the
    write still requires its instance up and idle, so a claim that lost a race to another process is
    simply not among the results (read back only then). [(the instance's document as read, holder)]
    of the claims that held. Raises PyMongoError."""
    free = {"_id": {"$in": candidates}, "state": "up", **seats.idle_filter(depth, now)}
    key = checkpoint_key(checkpoint)
    docs = sorted(
        db.sd_instances.find(free, {**_CLAIMED, "ckey": 1, "released_at": 1}),
        key=lambda d: (not key or d.get("ckey") != key, seats.aware(d.get("released_at")) or _EPOCH),
    )[: len(holders)]
    if not docs:
        return []
    picked = list(zip(docs, holders, strict=False))
    result = db.sd_instances.bulk_write(
        [
            UpdateOne({**free, "_id": doc["_id"]}, {"$set": seats.lease_set(0, holder, lease_s, now)})
            for doc, holder in picked
        ],
        ordered=False,
    )
    if result.modified_count < len(picked):  # someone else took one between our read and our write
        ours = {
            d["_id"]
            for d in db.sd_instances.find(
                {"_id": {"$in": [doc["_id"] for doc, _ in picked]}, seats.HOLDER[0]: {"$in": holders}},
                {"_id": 1},
            )
        }
        picked = [(doc, holder) for doc, holder in picked if doc["_id"] in ours]
    for doc, _ in picked:
        _took_over(doc["_id"], doc, 0)
    return picked


def claim_seat(
    db: Database, pick: Pick, holder: str, lease_s: float, now: datetime, depth: int
) -> dict[str, Any] | None:
    """Lease the planned seat to `holder` if it is still free (and, for an idle pick, every other seat too);
    the instance's document before the claim, or None."""
    cond: dict[str, Any] = {"_id": pick.url, "state": "up"}
    cond.update(seats.idle_filter(depth, now) if pick.idle else seats.free_filter(pick.seat, now))
    got = db.sd_instances.find_one_and_update(
        cond, {"$set": seats.lease_set(pick.seat, holder, lease_s, now)}, projection=_CLAIMED
    )
    if got is not None:
        _took_over(pick.url, got, pick.seat)
    return got


def claim_planned(
    db: Database, pick: Pick, lease_s: float, now: datetime, depth: int = 1
) -> tuple[str, dict[str, Any]] | None:
    """Take one of the entry's wanted instances off the queue, then lease it the plan's seat.

    (lease id, the instance's document before the claim), or None: the entry was just handed
    an instance (the hint or the next scan delivers it), or someone else got the seat first
    (the entry gets its place back; the next scan re-plans).
    """
    doc = db.sd_waiters.find_one_and_update(
        {"_id": pick.entry, "want": {"$gt": 0}},
        {"$inc": {"want": -1, "granted": 1}},
        projection={"granted": 1},
        return_document=ReturnDocument.AFTER,
    )
    if doc is None:
        return None
    lease_id = f"{pick.entry}#{int(doc['granted'])}"  # numbered by the post-image: unique per entry
    got = claim_seat(db, pick, lease_id, lease_s, now, depth)
    if got is None:
        db.sd_waiters.update_one({"_id": pick.entry}, {"$inc": {"want": 1}})
        return None
    return lease_id, got
