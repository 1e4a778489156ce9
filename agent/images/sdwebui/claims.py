"""Taking a free instance in `sd_instances`: the fast claim (idle path) and the claim by plan.

Both are one atomic `find_one_and_update` on a document that is up and `takeable` (nobody
holds it, or its holder's lease ran out); taking over a dead holder's lease is logged.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database

from agent.images.sdwebui.planner import checkpoint_key
from agent.leases import lease_until, takeable

log = logging.getLogger(__name__)

_CLAIMED = {"holder": 1, "checkpoint": 1}  # the previous holder (for the log) and the loaded checkpoint


def _leased(holder: str, lease_s: float, now: datetime) -> dict[str, Any]:
    return {"$set": {"holder": holder, "lease_until": lease_until(lease_s, now), "leased_at": now}}


def _took_over(url: str, doc: dict[str, Any]) -> None:
    if doc.get("holder"):
        log.warning("SD instance %s: the lease of %s ran out (holder died?); taking over", url, doc["holder"])


def claim_free(
    db: Database, candidates: list[str], holder: str, checkpoint: str | None, lease_s: float, now: datetime
) -> dict[str, Any] | None:
    """Lease one free up instance of `candidates` to `holder`: one with `checkpoint` loaded if there is
    one, else the one idle longest. The instance's document before the claim (`_id`, `holder`,
    `checkpoint`), or None when none is free. Raises PyMongoError."""
    free = {"_id": {"$in": candidates}, "state": "up", **takeable(now)}
    update = _leased(holder, lease_s, now)
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
        _took_over(doc["_id"], doc)
    return doc


def claim_planned(
    db: Database, entry_id: str, url: str, lease_s: float, now: datetime
) -> tuple[str, dict[str, Any]] | None:
    """Take one of the entry's wanted instances off the queue, then lease it `url` (the plan's pick).

    (lease id, the instance's document before the claim), or None: the entry was just handed
    an instance (the hint or the next scan delivers it), or someone else got `url` first (the
    entry gets its place back; the next scan re-plans).
    """
    doc = db.sd_waiters.find_one_and_update(
        {"_id": entry_id, "want": {"$gt": 0}},
        {"$inc": {"want": -1, "granted": 1}},
        projection={"granted": 1},
        return_document=ReturnDocument.AFTER,
    )
    if doc is None:
        return None
    lease_id = f"{entry_id}#{int(doc['granted'])}"  # numbered by the post-image: unique per entry
    got = db.sd_instances.find_one_and_update(
        {"_id": url, "state": "up", **takeable(now)}, _leased(lease_id, lease_s, now), projection=_CLAIMED
    )
    if got is None:
        db.sd_waiters.update_one({"_id": entry_id}, {"$inc": {"want": 1}})
        return None
    _took_over(url, got)
    return lease_id, got
