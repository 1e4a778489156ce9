"""Rate-limit counters shared in MongoDB, but not paid for on every request.

limits' MongoDB storage does one findAndModify per request. That is the dearest thing a
cheap GET does (measured with bench/load.py against the embedded server), and every
client of a study shares it. This storage keeps the same documents (`ratelimit_counters`:
`{_id: key, count, expireAt}`), shared by every worker and host, and changes only *when*
they are written:

- the first hit on a key in a window goes to MongoDB (one round trip adds it and brings back the
  shared count and the window's end);
- other hits are counted in the process. A background thread, every `flush_s`, adds every key's
  pending hits in one bulk write and reads back the shared counts of every key this process used
  lately in one query: two round trips per interval and process, however many keys and hits (the
  old rule, one round trip for any hit on a view older than `flush_s`, cost one findAndModify per
  request at a participant's pace; `python bench/load.py` measured it as the embedded database's
  biggest load);
- a hit is allowed when `shared count last read + this process's hits since` is within the limit.
  A key this process has not used for `IDLE_S` is no longer read back, and a view older than
  `stale_s` (three flush intervals, at least 2 s: a flusher late behind a slow database, or failing)
  is not trusted: the next hit is a round trip again;
- only keys near their limit need every flush. A key whose count is under half its limit (`HOT_SHARE`,
  the limit read from limits' key, `.../<amount>/<multiples>/<granularity>`) and that this process hit
  fewer than `FAST_SHARE` (1/50) of the limit times since its last sync is synced every `cold_s`
  (5 flush intervals, 1 s at the default) instead. At a participant's pace that is every key, so a
  process's flusher costs two round trips per second, not ten (`bench/load.py`: 38 of the embedded
  database's ~200 commands/s in the paced phase were these flushes before).

So one process never lets a caller past its limit, and all processes together can
overshoot by at most what the *other* processes let through during one flush interval, or up to
`stale_s` while the database is slow (e.g. at 0.2 s: a caller spreading 10 requests/s over 4 workers
gets at most ~2 extra requests per window when the flushes keep time), plus, per other process, what
it let through unseen while the key was cold there: under 1/50 of the limit between two of its syncs
(a process syncs a key at the next flush once its own hits since the last sync reach that many, or the
count it sees reaches half the limit). `RATE_LIMIT_BATCH_S=0` turns batching off (exact, one round
trip per request). If MongoDB is away, counts wait in the process and are added on recovery.

URI scheme: `batched+mongodb://...` / `batched+mongodb+srv://...` (the rest is the
MongoDB URI); query option `flush_s` via `storage_options`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from limits.storage import MongoDBStorage
from pymongo import ReturnDocument, UpdateOne
from pymongo.errors import PyMongoError

log = logging.getLogger(__name__)

SCHEME_PREFIX = "batched+"
MAX_KEYS = 50_000  # local entries kept; idle, flushed ones are dropped first
IDLE_S = 5.0  # a key unused this long is no longer read back at each flush
# a view older than this (a flusher late behind a slow database, or failing) is not trusted: at least
# 2 s, so that a database slowed by load is not also handed one extra round trip per request
STALE_MIN_S = 2.0
HOT_SHARE = 0.5  # a key whose count reached this share of its limit is synced at every flush
FAST_SHARE = 0.02  # ... and one this process hit this share of its limit times since its last sync
COLD_FLUSHES = 5  # other keys: every 5th flush interval (but at most half of stale_s)


@dataclass
class _Counter:
    seen: int  # the shared count at the last round trip (includes our hits flushed so far)
    pending: int  # our hits since, not yet added to the shared count
    expiry_s: int  # the limit's window length
    ends_at: float  # UNIX time the shared window ends
    synced_at: float  # monotonic time of the last round trip (what other processes added is this old)
    used_at: float  # monotonic time of this process's last hit on the key
    limit: int | None  # the limit's amount (from the key), None: unknown (synced at every flush)


class BatchedMongoDBStorage(MongoDBStorage):
    """Fixed-window counters in MongoDB with per-process batching of increments."""

    STORAGE_SCHEME = ["batched+mongodb", "batched+mongodb+srv"]

    def __init__(self, uri: str, flush_s: float = 0.2, **options: Any) -> None:
        super().__init__(uri.removeprefix(SCHEME_PREFIX), **options)
        self.flush_s = max(0.01, float(flush_s))
        self.stale_s = max(STALE_MIN_S, 3 * self.flush_s)
        self.cold_s = max(self.flush_s, min(COLD_FLUSHES * self.flush_s, self.stale_s / 2))
        self._counters: dict[str, _Counter] = {}
        self._lock = threading.Lock()
        # one flush at a time: two at once (the flusher's and an explicit one, e.g. at close) would both
        # take the same pending hits and write them twice
        self._flushing = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self.round_trips = 0  # shared-counter round trips made (for tests and the benchmark)
        self.waited_round_trips = 0  # of those, made by a hit (the request waited for MongoDB)
        self._last_error_log = 0.0

    # ------------------------------------------------------------------ the strategy's calls
    def incr(self, key: str, expiry: int, amount: int = 1) -> int:
        """The caller's count in this window after this hit (shared count + our unflushed hits)."""
        now = time.time()
        with self._lock:
            counter = self._live(key, now)
            if counter is not None and time.monotonic() - counter.synced_at < self.stale_s:
                counter.pending += amount
                counter.used_at = time.monotonic()
                self._ensure_flusher()
                return counter.seen + counter.pending
        # new key, new window, or a view the flusher stopped reading back: this hit goes to MongoDB and
        # brings back what the other processes added (so no process decides on a stale count for long)
        count, ends_at = self._add_shared(key, expiry, amount)
        self.waited_round_trips += 1
        with self._lock:
            racing = self._live(key, now)
            pending = racing.pending if racing is not None else 0
            mono = time.monotonic()
            self._counters[key] = _Counter(
                seen=count,
                pending=pending,
                expiry_s=expiry,
                ends_at=ends_at,
                synced_at=mono,
                used_at=mono,
                limit=_limit_of(key),
            )
            self._ensure_flusher()
            return count + pending

    def get(self, key: str) -> int:
        with self._lock:
            counter = self._live(key, time.time())
            if counter is not None:
                return counter.seen + counter.pending
        return int(super().get(key))

    def get_expiry(self, key: str) -> float:
        with self._lock:
            counter = self._live(key, time.time())
            if counter is not None:
                return counter.ends_at
        return float(super().get_expiry(key))

    def _live(self, key: str, now: float) -> _Counter | None:
        """This process's counter for `key` if its window has not ended (lock held)."""
        counter = self._counters.get(key)
        return counter if counter is not None and counter.ends_at > now else None

    def clear(self, key: str) -> None:
        with self._lock:
            self._counters.pop(key, None)
        super().clear(key)

    def reset(self) -> int | None:
        with self._lock:
            self._counters.clear()
        return super().reset()

    # ------------------------------------------------------------------ shared counter
    @staticmethod
    def _adding(amount: int, expiry: int) -> list[dict[str, Any]]:
        """The update pipeline that adds `amount`, starting a new window if the stored one ended."""
        now = datetime.now(UTC)
        new_end = now + timedelta(seconds=expiry)
        # the client's clock, not $$NOW: the embedded server compares $$NOW with dates as equal (so
        # limits' own storage never starts a new window there), and hosts are NTP-synced anyway
        ended = {"$lt": ["$expireAt", now]}
        return [
            {
                "$set": {
                    "count": {"$cond": {"if": ended, "then": amount, "else": {"$add": ["$count", amount]}}},
                    "expireAt": {"$cond": {"if": ended, "then": new_end, "else": "$expireAt"}},
                }
            }
        ]

    def _add_shared(self, key: str, expiry: int, amount: int) -> tuple[int, float]:
        """Add `amount` to the shared counter (starting a new window if it ended); (count, window end)."""
        doc = self.counters.find_one_and_update(
            {"_id": key},
            self._adding(amount, expiry),
            upsert=True,
            projection={"count": 1, "expireAt": 1},
            return_document=ReturnDocument.AFTER,
        )
        self.round_trips += 1
        if not doc:
            return amount, time.time() + expiry
        return int(doc["count"]), _timestamp(doc["expireAt"])

    # ------------------------------------------------------------------ background flush
    def _ensure_flusher(self) -> None:
        """Start the flush thread in this process (lazily: gunicorn forks after the app may exist)."""
        if self._thread is not None and self._thread.is_alive() and self._pid == os.getpid():
            return
        self._pid = os.getpid()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="ratelimit-flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.flush_s):
            self.flush(everything=False)

    def _due(self, counter: _Counter, mono: float) -> bool:
        """Whether a periodic flush syncs this key: near its limit, hit fast here, or cold_s since its last
        sync (lock held)."""
        if counter.limit is None or mono - counter.synced_at >= self.cold_s:
            return True
        view = counter.seen + counter.pending
        return view >= counter.limit * HOT_SHARE or counter.pending >= counter.limit * FAST_SHARE

    def flush(self, everything: bool = True) -> int:
        """Add the pending hits (one bulk write) and read back the shared count of every key used lately
        (one query): every key, or (the periodic flush, everything=False) the keys `_due` says. Returns
        how many keys had hits to write."""
        with self._flushing:
            return self._flush(everything)

    def _flush(self, everything: bool) -> int:
        now = time.time()
        mono = time.monotonic()
        with self._lock:
            self._forget_idle(now)
            chosen = {
                k: c
                for k, c in self._counters.items()
                if (c.pending > 0 or mono - c.used_at < IDLE_S) and (everything or self._due(c, mono))
            }
            work = {k: (c.pending, c.expiry_s) for k, c in chosen.items() if c.pending > 0}
            watched = list(chosen)
        if not watched:
            return 0
        try:
            if work:
                self.counters.bulk_write(
                    [
                        UpdateOne({"_id": k}, self._adding(n, exp), upsert=True)
                        for k, (n, exp) in work.items()
                    ],
                    ordered=False,
                )
                self.round_trips += 1
            shared = {
                doc["_id"]: doc
                for doc in self.counters.find({"_id": {"$in": watched}}, {"count": 1, "expireAt": 1})
            }
            self.round_trips += 1
        except PyMongoError as exc:
            if time.monotonic() - self._last_error_log > 10:
                self._last_error_log = time.monotonic()
                log.warning("rate-limit counts kept in the process, MongoDB unavailable: %s", exc)
            return 0  # keep everything pending; the next flush tries again (a write that reached the
            # database before the error is then counted twice: a stricter limit, never a looser one)
        synced = time.monotonic()
        with self._lock:
            for key in watched:
                counter, doc = self._counters.get(key), shared.get(key)
                if counter is None or doc is None:
                    continue
                counter.pending = max(0, counter.pending - work.get(key, (0, 0))[0])
                counter.seen, counter.ends_at, counter.synced_at = (
                    int(doc["count"]),
                    _timestamp(doc["expireAt"]),
                    synced,
                )
        return len(work)

    def _forget_idle(self, now: float) -> None:
        """Drop ended windows with nothing pending; bound the table (lock held)."""
        for key in [k for k, c in self._counters.items() if c.ends_at <= now and c.pending == 0]:
            del self._counters[key]
        if len(self._counters) > MAX_KEYS:
            idle = [k for k, c in self._counters.items() if c.pending == 0]
            for key in idle[: len(self._counters) - MAX_KEYS]:
                del self._counters[key]

    def close(self) -> None:
        """Stop the flusher, write what is pending, close the client."""
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(2.0)
        try:
            self.flush()
        except PyMongoError as exc:
            log.warning("rate-limit counts not flushed at shutdown: %s", exc)
        if self._storage is not None:
            self._storage.close()


def _limit_of(key: str) -> int | None:
    """The limit's amount in limits' key (`<namespace>/<identifiers...>/<amount>/<multiples>/<granularity>`);
    None if the key is not one of those."""
    parts = key.rsplit("/", 3)
    return int(parts[1]) if len(parts) == 4 and parts[1].isdigit() and parts[2].isdigit() else None


def _timestamp(value: datetime) -> float:
    """UNIX time of a stored date (naive ones are UTC, as pymongo returns them without tz_aware)."""
    return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).timestamp()
