"""Instance health in `sd_instances`: what a call's outcome says about its instance, probes, status.

Each instance document holds `state` up/down, its seats' leases (`holder` / `lease_until`, and
`holder_1` / `lease_until_1` with depth 2: `seats.py`), the `checkpoint` last known to be
loaded, `failures`, `next_probe_at`, `last_error`, `served`. Health is per instance: it
applies to both seats.

A refused connection or a timeout marks an instance down at once; a 5xx or an empty image
counts a failure, two in a row mark it down. Down instances are probed (`SDClient.ping`,
claimed atomically so one process probes) with backoff 2 s, 4 s, ... 60 s and come back up
when they answer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from pymongo import ReturnDocument
from pymongo.database import Database
from pymongo.errors import PyMongoError

from agent.images.sdwebui import seats
from agent.images.sdwebui.client import PROVIDER, SDClient, SDError
from agent.images.sdwebui.planner import aware, checkpoint_key
from agent.images.sdwebui.queue import Lease
from agent.leases import utcnow
from agent.types import ModelError

log = logging.getLogger(__name__)

STATS_ID = "sd_pool"
DOWN_AT_ONCE = {"connect", "timeout"}
COUNTED = {"server", "empty"}
FAILURES_TO_DOWN = 2


def _short(error: SDError | None) -> str | None:
    return error.message[:300] if error is not None else None


def _iso(value: Any) -> str | None:
    dt = aware(value)
    return dt.isoformat() if dt else None


def register_instances(db: Database, urls: list[str], probe_base_s: float) -> None:
    """Upsert our instances without touching a live lease or health state another worker wrote."""
    now = utcnow()
    for url in urls:
        db.sd_instances.update_one(
            {"_id": url},
            {
                "$setOnInsert": {
                    "state": "up",
                    "holder": None,
                    "lease_until": None,
                    "holder_1": None,
                    "lease_until_1": None,
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
    db.sd_instances.update_many(
        {
            "_id": {"$in": urls},
            "state": "down",
            "next_probe_at": {"$gt": now + timedelta(seconds=probe_base_s)},
        },
        {"$set": {"next_probe_at": now}},
    )


def down_fields(now: datetime, error: SDError | None, probe_base_s: float) -> dict[str, Any]:
    return {
        "state": "down",
        "down_since": now,
        "probe_failures": 0,
        "next_probe_at": now + timedelta(seconds=probe_base_s),
        "last_error": _short(error),
    }


def record_release(
    db: Database,
    lease: Lease,
    *,
    ok: bool,
    error: SDError | None,
    checkpoint: str | None,
    probe_base_s: float,
    lease_s: float,
) -> None:
    """Free our seat of the instance (if we still hold it) and record what the call said about its health."""
    now = utcnow()
    release_set = seats.freed_set(lease.seat, now)
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
        health_set = down_fields(now, error, probe_base_s)
    elif failure in COUNTED:
        inc = {"failures": 1}
        health_set = {"last_error": _short(error)}
    update: dict[str, Any] = {"$set": {**release_set, **health_set}}
    if inc:
        update["$inc"] = inc
    try:
        doc = db.sd_instances.find_one_and_update(
            {"_id": lease.url, seats.HOLDER[lease.seat]: lease.id},
            update,
            return_document=ReturnDocument.AFTER,
        )
        if doc is None:  # our lease ran out and someone else holds it now: keep theirs, record health
            log.warning("lease %s on %s had expired before release", lease.id, lease.url)
            health_update: dict[str, Any] = {}
            if health_set:
                health_update["$set"] = health_set
            if inc:
                health_update["$inc"] = inc
            if health_update:
                doc = db.sd_instances.find_one_and_update(
                    {"_id": lease.url}, health_update, return_document=ReturnDocument.AFTER
                )
        if (
            failure in COUNTED
            and doc is not None
            and doc.get("state") == "up"
            and int(doc.get("failures") or 0) >= FAILURES_TO_DOWN
        ):
            db.sd_instances.update_one(
                {"_id": lease.url, "state": "up"}, {"$set": down_fields(now, error, probe_base_s)}
            )
    except PyMongoError as exc:
        log.error("could not release %s (it frees itself in %.0f s): %s", lease.url, lease_s, exc)
    if failure in DOWN_AT_ONCE or failure in COUNTED:
        log.warning("SD instance %s failed (%s): %s", lease.url, failure, error.message if error else "")


def free(db: Database, url: str, holder: str, seat: int = 0) -> int:
    """Free `url`'s seat if `holder` still holds it; how many documents changed (0 or 1)."""
    res = db.sd_instances.update_one(
        {"_id": url, seats.HOLDER[seat]: holder}, {"$set": seats.freed_set(seat, utcnow())}
    )
    return res.modified_count


def free_held(db: Database, urls: list[str], prefix: str) -> int:
    """Free the seats whose holder starts with `prefix` (one process's leases); how many were freed."""
    freed = 0
    for doc in db.sd_instances.find({"_id": {"$in": urls}}, seats.FIELDS):
        for seat, holder in seats.holders(doc):
            if holder.startswith(prefix):
                freed += free(db, doc["_id"], holder, seat)
    return freed


class Prober:
    """Probes down instances, one probe thread per instance per process (the claim makes it one overall)."""

    def __init__(
        self,
        db: Database,
        clients: dict[str, SDClient],
        *,
        ping_timeout_s: float,
        probe_base_s: float,
        probe_max_s: float,
        on_done: Callable[[], None],
    ) -> None:
        self.db = db
        self.clients = clients
        self.ping_timeout_s = ping_timeout_s
        self.probe_base_s = probe_base_s
        self.probe_max_s = probe_max_s
        self.on_done = on_done
        self._lock = threading.Lock()
        self._probing: set[str] = set()

    def reset(self) -> None:
        """After a fork: the parent's probe threads did not come along."""
        self._probing.clear()

    def backoff(self, probe_failures: int) -> float:
        return min(self.probe_max_s, self.probe_base_s * (2**probe_failures))

    def start(self, url: str, now: datetime, process_id: str) -> None:
        """Probe `url` in a thread, unless this process already does or another process claimed it."""
        with self._lock:
            if url in self._probing:
                return
        # claim the probe: push next_probe_at past the probe's timeout so other processes skip it
        doc = self.db.sd_instances.find_one_and_update(
            {"_id": url, "state": "down", "$or": [{"next_probe_at": None}, {"next_probe_at": {"$lte": now}}]},
            {
                "$set": {
                    "next_probe_at": now + timedelta(seconds=self.ping_timeout_s + 5.0),
                    "probing": process_id,
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

    def start_due(self, instances: list[dict[str, Any]], now: datetime, process_id: str) -> None:
        """Probe the down instances of a snapshot whose next probe is due."""
        for doc in instances:
            if doc.get("state") == "down" and (aware(doc.get("next_probe_at")) or now) <= now:
                self.start(doc["_id"], now, process_id)

    def _probe(self, url: str, probe_failures: int) -> None:
        try:
            ok = self.clients[url].ping(self.ping_timeout_s)
            now = utcnow()
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
                            "next_probe_at": now + timedelta(seconds=self.backoff(probe_failures + 1)),
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
            self.on_done()


def probe_due(db: Database, urls: list[str], prober: Prober, process_id: str) -> set[str]:
    """Probe the down instances whose next probe is due (outside a scan); the up instances."""
    now = utcnow()
    instances = list(db.sd_instances.find({"_id": {"$in": urls}}, {"state": 1, "next_probe_at": 1}))
    prober.start_due(instances, now, process_id)
    return {d["_id"] for d in instances if d.get("state", "up") == "up"}


def refresh_checkpoints(db: Database, urls: list[str], timeout_s: float) -> dict[str, str | None]:
    """Ask every instance which checkpoint it has loaded (for model affinity). Best effort."""
    found: dict[str, str | None] = {}

    def one(url: str) -> None:
        client = SDClient(url, timeout_s)
        try:
            name = (client.options() or {}).get("sd_model_checkpoint")
        except SDError:
            return
        finally:
            client.close()
        found[url] = name
        if name:
            try:
                db.sd_instances.update_one(
                    {"_id": url}, {"$set": {"checkpoint": name, "ckey": checkpoint_key(name)}}
                )
            except PyMongoError as exc:
                log.warning("could not store the checkpoint of %s: %s", url, exc)

    threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return found


def answering(clients: dict[str, SDClient], urls: list[str], wait_s: float) -> dict[str, bool]:
    """Which instances answer `SDClient.ping` now; all pinged at once. Changes no state."""
    found: dict[str, bool] = {}

    def one(url: str) -> None:
        found[url] = clients[url].ping(wait_s)

    threads = [threading.Thread(target=one, args=(u,), name="sd-health", daemon=True) for u in urls]
    for t in threads:
        t.start()
    deadline = time.monotonic() + wait_s + 1.0
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return {u: found.get(u, False) for u in urls}


def status(
    db: Database, urls: list[str], queue_length: Callable[[datetime], int], depth: int = 1
) -> dict[str, Any]:
    """The pool's shared view of its instances and queue, from the collections only (per instance URL:
    `busy` when any seat is held, `seats_busy` how many)."""
    now = utcnow()
    docs = {d["_id"]: d for d in db.sd_instances.find({"_id": {"$in": urls}})}
    queue = queue_length(now)
    rows = []
    for url in urls:
        d = docs.get(url, {})
        held = len(seats.busy_seats(d, now, seats.MAX_DEPTH)) if d else 0
        rows.append(
            {
                "url": url,
                "state": d.get("state", "up"),
                "busy": held > 0,
                "seats_busy": held,
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
        "depth": depth,
    }


def served(db: Database, urls: list[str]) -> dict[str, Any]:
    """Generations served per instance, their shares, and the deepest queue any process saw."""
    docs = {
        d["_id"]: d
        for d in db.sd_instances.find({"_id": {"$in": urls}}, {"served": 1, "state": 1, "checkpoint": 1})
    }
    counters = db.counters.find_one({"_id": STATS_ID}) or {}
    per_url = {u: int((docs.get(u) or {}).get("served") or 0) for u in urls}
    total = sum(per_url.values())
    return {
        "served": per_url,
        "share": {u: (n / total if total else 0.0) for u, n in per_url.items()},
        "total_served": total,
        "max_queue": int(counters.get("max_queue") or 0),
    }


def note_queue_depth(db: Database, depth: int) -> None:
    """Record the deepest queue seen (best effort)."""
    try:
        db.counters.update_one({"_id": STATS_ID}, {"$max": {"max_queue": depth}}, upsert=True)
    except PyMongoError:
        pass


def timeout_error(
    db: Database, urls: list[str], queue_length: Callable[[datetime], int], waited_s: float
) -> ModelError:
    """The 503 a caller gets when no instance became free in time, saying why."""
    try:
        docs = list(db.sd_instances.find({"_id": {"$in": urls}}, {"state": 1, "last_error": 1}))
        queue = queue_length(utcnow())
    except PyMongoError:
        docs, queue = [], -1
    up = sum(1 for d in docs if d.get("state", "up") == "up")
    down = [f"{d['_id']} ({d.get('last_error') or 'down'})" for d in docs if d.get("state") == "down"]
    msg = (
        f"no Stable Diffusion instance became free within {waited_s:g} s: "
        f"{up} of {len(urls)} instances up, {max(queue, 0)} other callers waiting"
    )
    if down:
        msg += "; down: " + "; ".join(down)[:600]
    return ModelError(msg, provider=PROVIDER, status=503, retryable=True, kind="image")
