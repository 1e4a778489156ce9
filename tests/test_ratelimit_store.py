"""The batched rate-limit storage against the embedded MongoDB: exact within a process,
shared across processes after a flush, and never losing counts while the database is away."""

from __future__ import annotations

import threading
import time
from typing import Any

from limits import parse
from limits.storage import storage_from_string
from limits.strategies import FixedWindowRateLimiter

from apps.core.ratelimit_store import BatchedMongoDBStorage


def storage(mongo_uri: str, db_name: str, flush_s: float = 60.0) -> BatchedMongoDBStorage:
    """A long flush interval unless told otherwise: the tests flush by hand to control timing."""
    made = storage_from_string(
        "batched+" + mongo_uri,
        database_name=db_name,
        flush_s=flush_s,
        counter_collection_name="ratelimit_counters",
    )
    assert isinstance(made, BatchedMongoDBStorage)
    return made


def test_one_process_is_exact_with_one_round_trip_per_window(mongo_uri: str, db_name: str, db: Any) -> None:
    store = storage(mongo_uri, db_name)
    limiter = FixedWindowRateLimiter(store)
    limit = parse("10/minute")
    try:
        allowed = [limiter.hit(limit, "ip:1") for _ in range(15)]
        assert allowed == [True] * 10 + [False] * 5
        assert store.round_trips == 1  # the first hit learned the window; the rest were counted here
        assert db.ratelimit_counters.find_one({})["count"] == 1
        assert store.flush() == 1
        assert db.ratelimit_counters.find_one({})["count"] == 15  # every hit reached the shared counter
        assert store.flush() == 0  # nothing pending: no write
    finally:
        store.close()


def test_processes_share_the_count_after_a_flush(mongo_uri: str, db_name: str, db: Any) -> None:
    a, b = storage(mongo_uri, db_name), storage(mongo_uri, db_name)
    limit = parse("10/minute")
    la, lb = FixedWindowRateLimiter(a), FixedWindowRateLimiter(b)
    try:
        assert all(la.hit(limit, "user:ann") for _ in range(4))
        a.flush()
        assert all(lb.hit(limit, "user:ann") for _ in range(6))  # b's first hit read a's 4
        assert not lb.hit(limit, "user:ann")
        b.flush()
        # the documented overshoot: a has not read b's hits yet (at most one flush interval's worth)
        assert la.hit(limit, "user:ann")
        a.flush()
        assert not la.hit(limit, "user:ann")  # after the flush a sees b's hits: over the limit
        assert db.ratelimit_counters.find_one({"_id": {"$regex": "user:ann"}})["count"] >= 11
        # another caller is untouched
        assert la.hit(limit, "user:bob")
    finally:
        a.close()
        b.close()


def test_background_flush_and_close_write_pending_hits(mongo_uri: str, db_name: str, db: Any) -> None:
    store = storage(mongo_uri, db_name, flush_s=0.05)
    limiter = FixedWindowRateLimiter(store)
    limit = parse("1000/minute")
    threads = [
        threading.Thread(target=lambda: [limiter.hit(limit, "ip:9") for _ in range(50)]) for _ in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    deadline = time.monotonic() + 5
    while db.ratelimit_counters.find_one({})["count"] != 200 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.ratelimit_counters.find_one({})["count"] == 200
    assert store.round_trips < 100  # far fewer writes than hits
    limiter.hit(limit, "ip:9")
    store.close()  # writes the last pending hit
    assert db.ratelimit_counters.find_one({})["count"] == 201


def test_a_new_window_starts_from_zero(mongo_uri: str, db_name: str, db: Any) -> None:
    store = storage(mongo_uri, db_name)
    limiter = FixedWindowRateLimiter(store)
    limit = parse("3/second")
    try:
        assert [limiter.hit(limit, "k") for _ in range(4)] == [True, True, True, False]
        time.sleep(1.2)
        assert limiter.hit(limit, "k")
        assert 0 < store.get_expiry(limit.key_for("k")) - time.time() <= 1.0
    finally:
        store.close()


def test_hits_at_a_participants_pace_do_not_wait_for_mongodb(mongo_uri: str, db_name: str, db: Any) -> None:
    """Hits further apart than the flush interval are still counted in the process: the flusher reads
    the shared count back for every key in use (one bulk write + one query per interval, any key count)."""
    store = storage(mongo_uri, db_name, flush_s=0.05)
    limiter = FixedWindowRateLimiter(store)
    limit = parse("1000/minute")
    keys = [f"ip:{i}" for i in range(20)]
    try:
        for _ in range(4):
            for key in keys:
                assert limiter.hit(limit, key)
            time.sleep(0.15)  # three flush intervals between one key's hits
        assert store.waited_round_trips == len(keys)  # only each key's first hit in its window
        store.flush()
        flush_trips = store.round_trips - store.waited_round_trips
        assert flush_trips <= 2 * 20  # ~12 flushes in 0.6 s, two round trips each, not one per key
        assert sorted(d["count"] for d in db.ratelimit_counters.find()) == [4] * len(keys)
    finally:
        store.close()


def test_a_stale_view_is_not_trusted(mongo_uri: str, db_name: str, db: Any) -> None:
    """Without a flush for `stale_s` (flusher late or failing) a hit asks MongoDB again."""
    store = storage(mongo_uri, db_name)  # flush_s 60: the flusher sleeps through the test
    limiter = FixedWindowRateLimiter(store)
    limit = parse("1000/minute")
    try:
        assert limiter.hit(limit, "ip:1") and store.waited_round_trips == 1
        store.stale_s = 0.15  # as if the flusher were overdue after 0.15 s
        assert limiter.hit(limit, "ip:1") and store.waited_round_trips == 1  # fresh: counted here
        time.sleep(0.2)
        assert limiter.hit(limit, "ip:1") and store.waited_round_trips == 2
    finally:
        store.close()


def test_keys_far_from_their_limit_are_synced_every_cold_interval(
    mongo_uri: str, db_name: str, db: Any
) -> None:
    """The periodic flush syncs a key under half its limit, and hit slowly here, only every `cold_s`;
    a key near its limit, hit fast, or of unknown limit, at every flush."""
    a, b = storage(mongo_uri, db_name), storage(mongo_uri, db_name)  # flush_s 60: flushed by hand
    la, lb = FixedWindowRateLimiter(a), FixedWindowRateLimiter(b)
    roomy, tight = parse("1000/minute"), parse("10/minute")
    a.cold_s = 0.3

    def count(limit: Any, who: str) -> int:
        return db.ratelimit_counters.find_one({"_id": limit.key_for(who)})["count"]

    try:
        assert all(la.hit(roomy, "ip:slow") for _ in range(3))
        assert all(la.hit(tight, "ip:slow") for _ in range(3))
        assert a.incr("custom-key", 60) == 1 and a.incr("custom-key", 60) == 2
        assert a.flush(everything=False) == 2  # the tight key and the unknown one; the roomy one waits
        assert count(roomy, "ip:slow") == 1 and count(tight, "ip:slow") == 3
        assert db.ratelimit_counters.find_one({"_id": "custom-key"})["count"] == 2
        time.sleep(0.35)
        assert a.flush(everything=False) == 1  # cold_s after its last sync: the roomy key's turn
        assert count(roomy, "ip:slow") == 3

        # hit fast here (1/50 of the limit since the last sync): synced at every flush again
        assert all(la.hit(roomy, "ip:fast") for _ in range(21))
        assert a.flush(everything=False) == 1 and count(roomy, "ip:fast") == 21

        # near the limit (half of it, counted by another process): synced at every flush again
        assert la.hit(roomy, "ip:shared")
        assert all(lb.hit(roomy, "ip:shared") for _ in range(499))
        b.flush()
        a.flush()  # a reads b's hits: 500 of 1000
        assert la.hit(roomy, "ip:shared")
        assert a.flush(everything=False) == 1 and count(roomy, "ip:shared") == 501
    finally:
        a.close()
        b.close()


def test_the_limit_is_read_from_limits_key() -> None:
    from apps.core.ratelimit_store import _limit_of

    assert _limit_of(parse("600/minute").key_for("ip:1")) == 600
    assert _limit_of(parse("5 per 2 hours").key_for("user/with/slashes")) == 5
    assert _limit_of("custom-key") is None and _limit_of("a/b/c/d") is None


def test_two_flushes_at_once_write_the_pending_hits_once(mongo_uri: str, db_name: str, db: Any) -> None:
    """The periodic flush and an explicit one (e.g. at close) at the same moment: each pending hit is added to
    the shared count once (both used to take the same pending hits and write them twice)."""
    store = storage(mongo_uri, db_name)  # the periodic flusher waits 60 s: only our two flushes run
    limiter = FixedWindowRateLimiter(store)
    limit = parse("1000/minute")
    keys = [f"ip:{i}" for i in range(5)]
    try:
        for rnd in range(1, 4):
            for key in keys:
                for _ in range(10):
                    assert limiter.hit(limit, key)
            start = threading.Barrier(2)
            flushes = [threading.Thread(target=lambda b=start: (b.wait(), store.flush())) for _ in range(2)]
            for t in flushes:
                t.start()
            for t in flushes:
                t.join(10)
            assert sorted(d["count"] for d in db.ratelimit_counters.find()) == [10 * rnd] * len(keys)
    finally:
        store.close()
