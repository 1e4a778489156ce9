"""Long jobs: documents in MongoDB, run by a bounded thread pool, watched from anywhere.

A job document holds status (queued | working | done | failed | cancelled), progress,
data, error, owner and timestamps; `job_events` is its append-only event log with a
per-job sequence number (the SSE event id). Because both live in the database, any
worker on any host can report or stream a job that runs elsewhere.

The process that runs a job heartbeats its lease. A job whose lease ran out (its
worker was killed) is marked failed by whoever notices first: the heartbeat thread
of any live worker, a status read, or an SSE stream.

Shutdown (`begin_shutdown`, then `shutdown`): stop taking jobs at once, let running ones
finish for a grace period (their leases keep being renewed), then ask the rest to stop
(`JobShutdown` at their next cancellation check; abort hooks interrupt in-flight image
generations) and wait a little more, so their model calls end and write their generation
records before the caller closes the database. A job still running after that is marked
failed with code `shutdown`.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING, ReturnDocument, UpdateOne
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError, PyMongoError

from agent.leases import LeaseRenewer, expired, lease_until
from agent.types import ModelError

from .db import coordination
from .errors import ApiError

log = logging.getLogger(__name__)

ACTIVE = ("queued", "working")
TERMINAL = ("done", "failed", "cancelled")


class JobCancelled(Exception):
    """Raised inside a runner when its job was cancelled."""

    status = "cancelled"
    error: dict[str, str] = {"code": "cancelled", "message": "the job was cancelled"}


ABORT_REPEAT_S = 0.25  # shutdown: how often the abort hooks run again while jobs still run
SHUTDOWN_ERROR = {"code": "shutdown", "message": "the server shut down before the job finished; retry it"}


class JobShutdown(JobCancelled):
    """Raised inside a runner when the server stops before the job could finish: the job ends failed."""

    status = "failed"
    error = SHUTDOWN_ERROR


def create_indexes(db: Database) -> None:
    db.jobs.create_index([("status", ASCENDING), ("lease_until", ASCENDING)])
    db.jobs.create_index([("owner", ASCENDING), ("app", ASCENDING), ("created_at", -1)])
    db.jobs.create_index([("app", ASCENDING), ("legacy_id", ASCENDING)], sparse=True)
    db.job_events.create_index([("job", ASCENDING), ("seq", ASCENDING)], unique=True)


def _now() -> datetime:
    return datetime.now(UTC)


def new_job_id() -> str:
    return secrets.token_urlsafe(16)


def worker_identity() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class JobContext:
    """What a runner gets: report progress, append events, check for cancellation."""

    manager: JobManager
    job_id: str
    input: dict[str, Any]
    owner: str | None
    _last_cancel_check: float = 0.0
    _cancelled: bool = False

    def event(self, type_: str, data: Any = None) -> int:
        return self.manager.append_event(self.job_id, type_, data)

    def progress(self, current: int, total: int, message: str | None = None) -> None:
        self.manager.update(self.job_id, progress={"current": current, "total": total, "message": message})
        self.event("progress", {"current": current, "total": total, "message": message})

    def cancelled(self) -> bool:
        if self.manager.aborting:
            return True
        now = time.monotonic()
        if not self._cancelled and now - self._last_cancel_check > 0.25:
            self._last_cancel_check = now
            doc = self.manager.db.jobs.find_one({"_id": self.job_id}, {"cancel_requested": 1})
            self._cancelled = bool(doc and doc.get("cancel_requested"))
        return self._cancelled

    def check_cancelled(self) -> None:
        if self.cancelled():
            raise JobShutdown() if self.manager.aborting else JobCancelled()


Runner = Callable[[JobContext], Any]


class JobManager:
    """Create, run, watch, cancel and reap jobs for one process."""

    def __init__(self, db: Database, *, workers: int = 4, lease_s: float = 30.0) -> None:
        self.db = db
        self.lease_s = lease_s
        self.worker = worker_identity()
        self._pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="job")
        self._active: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()  # no new jobs
        self._abort = threading.Event()  # running jobs must stop now
        self._beat_stop = threading.Event()  # heartbeat off (after the drain: leases renew while it runs)
        self._idle = threading.Condition(self._lock)
        self._heartbeat: threading.Thread | None = None
        self.leased_collections: set[str] = set()  # see lease_collection()
        # in-progress records outside `jobs` (see holding()), renewed by the heartbeat (no thread of their own)
        self.record_leases = LeaseRenewer(lease_s, name="records", thread=False)
        # (app, owner, job id) -> extra fields (study, condition); set by apps/core/studies.py
        self.annotate: Callable[[str, str | None, str], dict[str, Any]] | None = None
        self._drain: threading.Thread | None = None
        self._abort_hooks: list[Callable[[], None]] = []
        # the last event number of each job this process runs: it numbers their events itself, so an
        # event is one insert (the unique (job, seq) index still guards against another writer)
        self._seqs: dict[str, int] = {}

    # ---- lifecycle

    def lease_collection(self, name: str) -> None:
        """Records of `name` with `status: working` carry a lease (`holding`); the reaper fails expired ones."""
        self.leased_collections.add(name)

    def start(self) -> None:
        if self._heartbeat is None:
            self._heartbeat = threading.Thread(target=self._beat, name="job-heartbeat", daemon=True)
            self._heartbeat.start()

    @property
    def aborting(self) -> bool:
        """True once the server asked running jobs to stop (JobContext.cancelled() says so too)."""
        return self._abort.is_set()

    def on_abort(self, hook: Callable[[], None]) -> None:
        """Call `hook` when running jobs are asked to stop (e.g. interrupt in-flight image generations), and
        every ABORT_REPEAT_S after while some still run (so `hook` must be idempotent)."""
        self._abort_hooks.append(hook)

    def _run_abort_hooks(self) -> None:
        for hook in self._abort_hooks:
            try:
                hook()
            except Exception:  # noqa: BLE001 - one hook failing must not stop the drain
                log.warning("shutdown: abort hook %r failed", hook, exc_info=True)

    def begin_shutdown(self, grace_s: float = 30.0, abort_s: float = 5.0) -> None:
        """Stop taking jobs now and drain the running ones in a background thread; returns at once (safe
        from a signal handler). Idempotent: the first call's times win."""
        with self._lock:
            self._stop.set()
            if self._drain is not None:
                return
            self._drain = threading.Thread(
                target=self._drain_jobs, args=(grace_s, abort_s), name="job-drain", daemon=True
            )
            self._drain.start()  # under the lock: shutdown() never sees a drain that is not started yet

    def shutdown(self, grace_s: float = 30.0, abort_s: float = 5.0) -> None:
        """Stop taking work, let running jobs finish for up to grace_s, stop the rest (up to abort_s more),
        fail whatever still runs; returns when that is done."""
        self.begin_shutdown(grace_s, abort_s)
        assert self._drain is not None
        self._drain.join()

    def _wait_idle(self, timeout: float) -> bool:
        """Wait until no job of this process runs; False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._active, timeout=max(0.0, timeout))

    def _drain_jobs(self, grace_s: float, abort_s: float) -> None:
        started = time.monotonic()
        if not self._wait_idle(grace_s):
            with self._lock:
                running = len(self._active)
            log.warning(
                "shutdown: %d job(s) still running after %.0f s; asking them to stop", running, grace_s
            )
            self._abort.set()
            deadline = time.monotonic() + abort_s
            # again while jobs still run: a generation queued behind an interrupted one (SD_QUEUE_DEPTH=2)
            # starts next and must be stopped too
            while True:
                self._run_abort_hooks()
                left = deadline - time.monotonic()
                if self._wait_idle(min(ABORT_REPEAT_S, left)) or left <= ABORT_REPEAT_S:
                    break
        with self._lock:
            leftover = list(self._active)
        for job_id in leftover:
            try:
                if self._finish(job_id, "failed", error=SHUTDOWN_ERROR):
                    log.warning("shutdown: job %s did not stop in time; marked failed", job_id)
            except PyMongoError as exc:
                log.warning(
                    "shutdown: could not mark job %s failed (%s); its lease will run out", job_id, exc
                )
        self._beat_stop.set()
        self._pool.shutdown(wait=False, cancel_futures=True)
        log.info(
            "shutdown: jobs drained in %.1f s (%d left running)", time.monotonic() - started, len(leftover)
        )

    # ---- create and run
    def submit(
        self,
        *,
        kind: str,
        app: str,
        runner: Runner,
        owner: str | None = None,
        input: dict[str, Any] | None = None,
        job_id: str | None = None,
        extra: dict[str, Any] | None = None,
        total: int | None = None,
    ) -> str:
        """Store a queued job and hand it to the pool. Returns the job id."""
        if self._stop.is_set():
            raise ApiError(503, "server is shutting down; try again shortly")
        job_id = job_id or new_job_id()
        now = _now()
        doc = {
            "_id": job_id,
            "kind": kind,
            "app": app,
            "owner": owner,
            "status": "queued",
            "input": input or {},
            "progress": {"current": 0, "total": total, "message": None},
            "data": None,
            "result": None,
            "error": None,
            "seq": 0,
            "cancel_requested": False,
            "runner": self.worker,
            "lease_until": lease_until(self.lease_s, now),
            "created_at": now,
            "started_at": None,
            "finished_at": None,
            **(extra or {}),
        }
        if self.annotate is not None:
            doc.update(self.annotate(app, owner, job_id))
        self.db.jobs.insert_one(doc)
        with self._lock:
            self._active.add(job_id)
            self._seqs[job_id] = 0
        self.append_event(job_id, "status", {"status": "queued"})
        self._pool.submit(self._run, job_id, runner)
        return job_id

    def _run(self, job_id: str, runner: Runner) -> None:
        try:
            doc = self.db.jobs.find_one_and_update(
                {"_id": job_id, "status": "queued"},
                {
                    "$set": {
                        "status": "working",
                        "started_at": _now(),
                        "runner": self.worker,
                        "lease_until": lease_until(self.lease_s),
                    }
                },
                return_document=ReturnDocument.AFTER,
            )
            if doc is None:  # cancelled while queued
                return
            self.append_event(job_id, "status", {"status": "working"})
            ctx = JobContext(self, job_id, doc.get("input") or {}, doc.get("owner"))
            try:
                result = runner(ctx)
            except JobCancelled as exc:  # JobShutdown included: it ends failed with code "shutdown"
                self._finish(job_id, exc.status, error=dict(exc.error))
            except ModelError as exc:
                log.warning("job %s failed on a model call: %s", job_id, exc.message)
                self._finish(job_id, "failed", error={"code": "model_error", **exc.to_dict()})
            except ApiError as exc:
                self._finish(job_id, "failed", error={"code": exc.code, "message": exc.message})
            except Exception as exc:  # noqa: BLE001 - any runner bug must end the job, not leave it working
                log.exception("job %s crashed", job_id)
                self._finish(
                    job_id,
                    "failed",
                    error={"code": "internal_error", "message": f"{type(exc).__name__}: {exc}"},
                )
            else:
                self._finish(job_id, "done", result=result)
        except PyMongoError as exc:
            if self._stop.is_set():  # the process is going away; the drain (or the reaper) ends the job
                log.warning("job %s: database error during shutdown: %s", job_id, exc)
            else:
                log.exception("job %s: database error while running; the reaper will mark it failed", job_id)
        finally:
            with self._idle:
                self._active.discard(job_id)
                self._seqs.pop(job_id, None)
                self._idle.notify_all()

    def _finish(self, job_id: str, status: str, *, result: Any = None, error: dict | None = None) -> bool:
        update: dict[str, Any] = {"status": status, "finished_at": _now(), "error": error}
        if result is not None:
            update["result"] = result
        event = {"type": status, "data": {"status": status, "error": error}}
        seq = self._next_seq(job_id)
        # status and the terminal event's number change in one update, so a reader never sees a
        # finished job without also seeing the number of its last event (a stream then waits for it)
        doc = self.db.jobs.find_one_and_update(
            {"_id": job_id, "status": {"$in": list(ACTIVE)}},
            {"$set": update, "$max": {"seq": seq}},
            projection={"seq": 1},
        )
        if doc is None:
            return False
        for _ in range(5):
            if self._insert_event(job_id, seq, event):
                with self._lock:
                    self._seqs.pop(job_id, None)
                return True
            seq = self._last_stored_seq(job_id) + 1  # another writer took it: the next free one
            self.db.jobs.update_one({"_id": job_id}, {"$max": {"seq": seq}})
        raise PyMongoError(f"job {job_id}: could not number its terminal event")

    def _next_seq(self, job_id: str) -> int:
        """The next event number: taken from this process's counter for a job it runs (no round trip),
        else one more than the last stored event."""
        with self._lock:
            if job_id in self._seqs:
                self._seqs[job_id] += 1
                return self._seqs[job_id]
        return self._last_stored_seq(job_id) + 1

    def _last_stored_seq(self, job_id: str) -> int:
        last = self.db.job_events.find_one({"job": job_id}, {"seq": 1}, sort=[("seq", DESCENDING)])
        return int(last["seq"]) if last else 0

    def _resync(self, job_id: str) -> None:
        """After a numbering clash: continue this process's counter after the last stored event."""
        last = self._last_stored_seq(job_id)
        with self._lock:
            if job_id in self._seqs:
                self._seqs[job_id] = max(self._seqs[job_id], last)

    def _insert_event(self, job_id: str, seq: int, event: dict[str, Any]) -> bool:
        """Store one event; False if that number is taken (the caller picks another)."""
        try:
            self.db.job_events.insert_one({"job": job_id, "seq": seq, **event, "at": _now()})
        except DuplicateKeyError:
            return False
        with self._lock:
            if job_id in self._seqs and seq > self._seqs[job_id]:
                self._seqs[job_id] = seq
        return True

    # ---- reads and writes
    def update(self, job_id: str, **fields: Any) -> None:
        self.db.jobs.update_one({"_id": job_id}, {"$set": fields})

    def append_event(self, job_id: str, type_: str, data: Any = None) -> int:
        """Append an event; returns its number (the SSE id). One insert for a job this process runs.

        The job document's `seq` follows with the heartbeat (and exactly at the end); streams watch
        the events themselves (apps/core/sse.py).
        """
        with self._lock:
            owned = job_id in self._seqs
        if not owned and self.db.jobs.count_documents({"_id": job_id}, limit=1) == 0:
            raise ApiError(404, f"no job {job_id}")
        for _ in range(5):
            seq = self._next_seq(job_id)
            if self._insert_event(job_id, seq, {"type": type_, "data": data}):
                if not owned:
                    self.db.jobs.update_one({"_id": job_id}, {"$max": {"seq": seq}})
                return seq
            self._resync(job_id)
        raise PyMongoError(f"job {job_id}: could not number an event after 5 tries")

    def get(self, job_id: str) -> dict[str, Any] | None:
        doc = self.db.jobs.find_one({"_id": job_id})
        if doc and doc["status"] in ACTIVE and doc.get("lease_until") and doc["lease_until"] < _now():
            self._reap_one(doc)
            doc = self.db.jobs.find_one({"_id": job_id})
        return doc

    def find_one(self, query: dict[str, Any]) -> dict[str, Any] | None:
        doc = self.db.jobs.find_one(query)
        return self.get(doc["_id"]) if doc else None

    def events_after(self, job_id: str, seq: int, limit: int = 500) -> list[dict[str, Any]]:
        return list(
            self.db.job_events.find({"job": job_id, "seq": {"$gt": seq}}, {"_id": 0})
            .sort("seq", 1)
            .limit(limit)
        )

    def cancel(self, job_id: str) -> dict[str, Any]:
        doc = self.get(job_id)
        if doc is None:
            raise ApiError(404, f"no job {job_id}")
        if doc["status"] in TERMINAL:
            return doc
        self.db.jobs.update_one({"_id": job_id}, {"$set": {"cancel_requested": True}})
        if doc["status"] == "queued":
            self._finish(
                job_id,
                "cancelled",
                error={"code": "cancelled", "message": "the job was cancelled before it started"},
            )
        return self.db.jobs.find_one({"_id": job_id}) or doc

    # ---- liveness
    def _beat(self) -> None:
        interval = max(0.5, self.lease_s / 3)
        while not self._beat_stop.wait(interval):
            try:
                with self._lock:
                    ids = list(self._active)
                if ids:
                    self._renew(ids)
                self.reap()
                self._beat_records()
            except PyMongoError as exc:
                log.warning("job heartbeat: database unavailable (%s); retrying", exc)

    def _renew(self, ids: list[str]) -> None:
        """Extend the leases of this process's jobs and bring their `seq` up to date: one command."""
        until = lease_until(self.lease_s)
        with self._lock:
            seqs = {job_id: self._seqs.get(job_id) for job_id in ids}
        ops = [
            UpdateOne(
                {"_id": job_id, "status": {"$in": list(ACTIVE)}},
                {"$set": {"lease_until": until}, **({"$max": {"seq": seq}} if seq else {})},
            )
            for job_id, seq in seqs.items()
        ]
        coordination(self.db.jobs).bulk_write(ops, ordered=False)  # every heartbeat: no journal wait

    def reap(self) -> int:
        """Fail every active job whose lease ran out (its worker died). Returns how many."""
        count = 0
        for doc in self.db.jobs.find({"status": {"$in": list(ACTIVE)}, **expired(_now())}).limit(100):
            count += self._reap_one(doc)
        return count

    def _beat_records(self) -> None:
        """Renew the leases of the records this process holds and fail expired ones (see below)."""
        _beat_records_of(self)

    def _reap_one(self, doc: dict[str, Any]) -> int:
        return int(
            self._finish(
                doc["_id"],
                "failed",
                error={
                    "code": "runner_died",
                    "message": f"the worker running this job ({doc.get('runner')}) stopped responding; retry the job",
                },
            )
        )


# ---- leased records: in-progress work stored outside `jobs` (an ideation request runs inside its HTTP
# request, not as a job), kept alive by the same heartbeat and failed by the same reaper when their
# process dies, instead of staying `working` forever

RECORD_DIED = "the worker serving this request stopped (killed or crashed) before it finished; retry it"


def reap_records(db: Database, collections: set[str], now: datetime | None = None) -> int:
    """Fail every `working` record of these leased collections whose lease ran out. Returns how many."""
    now = now or _now()
    count = 0
    for name in sorted(collections):
        result = db[name].update_many(
            {"status": "working", **expired(now)},
            {
                "$set": {
                    "status": "failed",
                    "error": RECORD_DIED,
                    "error_code": "runner_died",
                    "finished_at": now,
                },
                "$unset": {"lease_until": ""},
            },
        )
        count += result.modified_count
    return count


def lease_fields(manager: JobManager) -> dict[str, Any]:
    """Fields to store with a new `working` record: who runs it and until when it is alive."""
    return {"runner": manager.worker, "lease_until": lease_until(manager.lease_s)}


@contextmanager
def holding(manager: JobManager, collection: str, doc_id: Any) -> Iterator[None]:
    """While inside, this process's heartbeat renews the record's lease (while it is `working`)."""
    leases = manager.record_leases
    target = coordination(manager.db[collection])  # every heartbeat: no journal wait
    leases.hold(target, doc_id, field="status", value="working")
    try:
        yield
    finally:
        leases.drop(target, doc_id)


def _beat_records_of(manager: JobManager) -> None:
    manager.record_leases.renew()
    reap_records(manager.db, manager.leased_collections)


def public_job(doc: dict[str, Any]) -> dict[str, Any]:
    """The JSON view of a job document."""

    def iso(value: Any) -> Any:
        return value.isoformat() if isinstance(value, datetime) else value

    return {
        "id": doc["_id"],
        "kind": doc.get("kind"),
        "app": doc.get("app"),
        "owner": doc.get("owner"),
        "status": doc["status"],
        "progress": doc.get("progress"),
        "data": doc.get("data"),
        "result": doc.get("result"),
        "error": doc.get("error"),
        "events": doc.get("seq", 0),
        "created_at": iso(doc.get("created_at")),
        "started_at": iso(doc.get("started_at")),
        "finished_at": iso(doc.get("finished_at")),
    }
