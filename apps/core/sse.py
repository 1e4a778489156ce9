"""Server-Sent Events for jobs, read from the database so any worker can serve them.

A stream replays events after `Last-Event-ID` (or `?last_event_id=`), then follows
new ones until the job's terminal event, sending a comment at once and at least
every heartbeat interval. One watcher thread per process polls the sequence
numbers of watched jobs and wakes the streams, so many subscribers of one job cost
one poll, not one each.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from typing import Any

from flask import Response, request, stream_with_context
from pymongo.errors import PyMongoError

from .jobs import TERMINAL, JobManager
from .storage import absolute_image_urls

GAP_WAIT_S = 2.0
EventFormatter = Callable[[dict[str, Any]], "str | None"]
DB_RETRY_S = 5.0  # reconnect delay suggested to EventSource clients when the database is unavailable


def format_sse(data: Any, *, event: str | None = None, id: int | str | None = None) -> str:
    lines = []
    if id is not None:
        lines.append(f"id: {id}")
    if event:
        lines.append(f"event: {event}")
    # stored events hold server-relative image URLs; the stream answers with absolute ones
    text = (
        data
        if isinstance(data, str)
        else json.dumps(absolute_image_urls(data), ensure_ascii=False, default=str)
    )
    lines.extend(f"data: {line}" for line in text.split("\n"))
    return "\n".join(lines) + "\n\n"


def default_formatter(event: dict[str, Any]) -> str:
    return format_sse(
        {"seq": event["seq"], "type": event["type"], "data": event.get("data")},
        event=event["type"],
        id=event["seq"],
    )


class JobWatcher:
    """Polls the newest event number of jobs that have subscribers and wakes them on change."""

    def __init__(self, manager: JobManager, poll_s: float = 0.2) -> None:
        self.manager = manager
        self.poll_s = poll_s
        self._cond = threading.Condition()
        self._seq: dict[str, int] = {}
        self._watchers: defaultdict[str, int] = defaultdict(int)
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="sse-watcher", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while True:
            with self._cond:
                ids = [k for k, v in self._watchers.items() if v > 0]
            if ids:
                try:
                    # the events themselves, not the job's `seq`: a runner numbers its job's events without
                    # touching the job document (apps/core/jobs.py), and every end of a job is an event
                    with self._cond:
                        floor = min(self._seq.get(job_id, 0) for job_id in ids)
                    latest = self.manager.db.job_events.aggregate(
                        [
                            {"$match": {"job": {"$in": ids}, "seq": {"$gt": floor}}},
                            {"$group": {"_id": "$job", "seq": {"$max": "$seq"}}},
                        ]
                    )
                    changed = False
                    with self._cond:
                        for doc in latest:
                            if doc["seq"] > self._seq.get(doc["_id"], 0):
                                self._seq[doc["_id"]] = doc["seq"]
                                changed = True
                        if changed:
                            self._cond.notify_all()
                except PyMongoError:
                    pass  # streams notice the outage themselves on their next read
            time.sleep(self.poll_s)

    def subscribe(self, job_id: str) -> None:
        with self._cond:
            self._watchers[job_id] += 1
        self._ensure_thread()

    def unsubscribe(self, job_id: str) -> None:
        with self._cond:
            self._watchers[job_id] -= 1
            if self._watchers[job_id] <= 0:
                self._watchers.pop(job_id, None)
                self._seq.pop(job_id, None)

    def wait(self, job_id: str, known_seq: int, timeout: float) -> None:
        with self._cond:
            if self._seq.get(job_id, -1) > known_seq:
                return
            self._cond.wait_for(lambda: self._seq.get(job_id, -1) > known_seq, timeout=timeout)


def last_event_id(default: int = 0) -> int:
    raw = request.headers.get("Last-Event-ID") or request.args.get("last_event_id")
    try:
        return max(0, int(raw)) if raw is not None else default
    except ValueError:
        return default


def job_event_stream(
    manager: JobManager,
    watcher: JobWatcher,
    job_id: str,
    *,
    after: int = 0,
    formatter: EventFormatter = default_formatter,
    heartbeat_s: float = 15.0,
    on_missing_terminal: Callable[[dict[str, Any]], str | None] | None = None,
) -> Iterator[str]:
    """Yield SSE text for a job from `after` until its terminal event."""
    yield ": stream open\n\n"
    watcher.subscribe(job_id)
    last_sent = time.monotonic()
    seq = after
    gap_since: float | None = None
    try:
        while True:
            events = manager.events_after(job_id, seq)
            # a sequence number is drawn before its event is inserted: wait briefly at a gap rather
            # than skip an event another thread is about to write (skip it only if it never comes)
            contiguous = []
            for event in events:
                if event["seq"] != seq + 1 + len(contiguous):
                    break
                contiguous.append(event)
            if events and len(contiguous) < len(events) and not contiguous:
                gap_since = gap_since or time.monotonic()
                if time.monotonic() - gap_since < GAP_WAIT_S:
                    time.sleep(0.02)
                    continue
                contiguous = events  # the missing event was never written (its writer died)
            gap_since = None
            events = contiguous
            for event in events:
                seq = event["seq"]
                text = formatter(event)
                if text:
                    yield text
                    last_sent = time.monotonic()
                if event["type"] in TERMINAL:
                    return
            if events:
                continue
            doc = manager.get(job_id)  # also reaps a dead runner's job
            if doc is None:
                return
            if doc["status"] in TERMINAL and doc.get("seq", 0) <= seq:
                if on_missing_terminal:
                    text = on_missing_terminal(doc)
                    if text:
                        yield text
                return
            if time.monotonic() - last_sent >= heartbeat_s:
                yield ": keep-alive\n\n"
                last_sent = time.monotonic()
            watcher.wait(job_id, seq, timeout=min(heartbeat_s, 2.0))
    except PyMongoError:
        # the database went away mid-stream: end cleanly and ask the browser to reconnect later
        # (EventSource resumes from Last-Event-ID, so nothing is lost) instead of a broken chunk
        yield f"retry: {int(DB_RETRY_S * 1000)}\n: database unavailable, reconnect shortly\n\n"
    finally:
        watcher.unsubscribe(job_id)


def sse_response(stream: Iterator[str]) -> Response:
    resp = Response(stream_with_context(stream), mimetype="text/event-stream")
    resp.headers["Cache-Control"] = "no-cache"
    resp.headers["X-Accel-Buffering"] = "no"
    resp.headers["Connection"] = "keep-alive"
    return resp
