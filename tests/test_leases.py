"""agent.leases against the embedded MongoDB: renewal pushes leases out, lost ones are reported."""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

from agent.leases import LeaseRenewer, expired, lease_until, takeable, utcnow


def test_takeable_finds_free_and_expired_only(db: Any) -> None:
    now = utcnow()
    db.things.insert_many(
        [
            {"_id": "free", "holder": None, "lease_until": None},
            {"_id": "dead", "holder": "x", "lease_until": now - timedelta(seconds=1)},
            {"_id": "live", "holder": "y", "lease_until": now + timedelta(seconds=30)},
        ]
    )
    assert sorted(d["_id"] for d in db.things.find(takeable(now))) == ["dead", "free"]
    assert [d["_id"] for d in db.things.find(expired(now))] == ["dead"]


def test_renew_pushes_out_only_leases_still_ours(db: Any) -> None:
    start = utcnow()
    db.slots.insert_many(
        [{"_id": i, "holder": f"t{i}", "lease_until": lease_until(1, start)} for i in range(3)]
    )
    db.records.insert_one({"_id": "r", "status": "working", "lease_until": lease_until(1, start)})
    lost: list[int] = []
    renewer = LeaseRenewer(60, name="test", thread=False, on_lost=lost.append)
    for i in range(3):
        renewer.hold(db.slots, i, field="holder", value=f"t{i}")
    renewer.hold(db.records, "r", field="status", value="working")
    db.slots.update_one({"_id": 2}, {"$set": {"holder": "someone else"}})  # taken over
    assert renewer.renew() == 3
    assert lost == [1]
    leases = {d["_id"]: d["lease_until"] for d in db.slots.find()}
    assert leases[0] > lease_until(50, start)
    assert leases[2] < lease_until(2, start)
    renewer.drop(db.slots, 0)
    assert renewer.held() == 3


def test_thread_renews_while_held_and_stops_when_empty(db: Any) -> None:
    db.slots.insert_one({"_id": "a", "holder": "me", "lease_until": lease_until(0.3)})
    renewer = LeaseRenewer(0.3, name="test", every_s=0.05)
    renewer.hold(db.slots, "a", field="holder", value="me")
    time.sleep(0.6)
    assert db.slots.find_one({"_id": "a"})["lease_until"] > utcnow()
    renewer.drop(db.slots, "a")
    time.sleep(0.2)
    assert renewer._thread is None
    renewer.close()
