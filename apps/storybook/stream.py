"""The two SSE views of a book, both folds of the job's event log (so any worker serves them).

- `LegacySnapshots`: the original Rotate-Calvary stream. Every message is a *cumulative
  snapshot* `{"status", "progress": {"total": 4, "current"}, "data"}`; `data` is `null` until
  the title exists, then grows in the original key order `user_input, total_pages, title,
  text_description, image_description, illustrations` (+ `cover`). Text appears as it is
  written (the page being written is the last, partial entry of `text_description`). A
  page's image description and picture are shown once its text is final, and pictures in
  page order, so list indices never shift under the original frontend. The stream ends
  after `done` (or `failed` / `cancelled` with a top-level `error` object). No `event:`
  field (the original frontend listens to `onmessage`), `id:` = the event log sequence, so
  `Last-Event-ID` resumes exactly: the events up to that id are folded silently first.
- `rich_formatter`: the JSON API's stream, one SSE event per log event (`event: page.delta`,
  `page.text`, `page.image`, `cover`, `book.plan`, `stage`, `error`, `done`, ...).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

from apps.core.jobs import TERMINAL, JobManager
from apps.core.sse import JobWatcher, format_sse, job_event_stream
from apps.core.storage import absolute_image_urls

LEGACY_TOTAL = 4


class LegacySnapshots:
    """Folds job events into the original's snapshot messages."""

    def __init__(self, user_input: str, total_pages: int) -> None:
        self.user_input = user_input
        self.total_pages = total_pages
        self.started = False
        self.title: str | None = None
        self.texts: dict[int, str] = {}
        self.final: set[int] = set()
        self.scenes: dict[int, str] = {}
        self.images: dict[int, str] = {}
        self.cover: str | None = None
        self.status = "working"
        self.error: dict[str, Any] | None = None
        self.detail: dict[str, Any] = {}
        self._last: str | None = None

    # ---- folding
    def apply(self, event: dict[str, Any]) -> None:
        kind, data = event.get("type"), event.get("data") or {}
        if kind == "status" and data.get("status") == "working":
            self.started = True
        elif kind == "book.plan":
            self.started = True
            self.title = data.get("title")
            for page in data.get("pages") or []:
                self.scenes[int(page["page"])] = page.get("scene") or ""
        elif kind == "page.delta":
            page = int(data["page"])
            if page not in self.final:
                self.texts[page] = self.texts.get(page, "") + (data.get("delta") or "")
        elif kind == "page.reset":
            page = int(data["page"])
            self.texts.pop(page, None)
            self.final.discard(page)
        elif kind == "page.text":
            page = int(data["page"])
            self.texts[page] = data.get("text") or ""
            self.final.add(page)
        elif kind == "page.image":
            self.images[int(data["page"])] = data.get("url")
        elif kind == "cover":
            self.cover = data.get("url")
        elif kind == "error":
            self.detail = dict(data)
        elif kind in TERMINAL:
            self.started = True
            self.status = kind
            if kind != "done":
                self.error = {**self.detail, **(data.get("error") or {})}
                self.error.setdefault("code", kind)

    # ---- the view
    def snapshot(self) -> dict[str, Any] | None:
        if not self.started:
            return None
        data: dict[str, Any] | None = None
        current = 0
        if self.title is not None:
            current = 1
            data = {"user_input": self.user_input, "total_pages": self.total_pages, "title": self.title}
            k = 0
            while k + 1 in self.final:
                k += 1
            texts = [self.texts[i] for i in range(1, k + 1)]
            partial = self.texts.get(k + 1)
            if partial and k + 1 <= self.total_pages:
                texts.append(partial)
            if texts:
                data["text_description"] = texts
            if k:
                data["image_description"] = [self.scenes.get(i, "") for i in range(1, k + 1)]
            m = 0
            while m < k and self.images.get(m + 1):
                m += 1
            if m:
                data["illustrations"] = [self.images[i] for i in range(1, m + 1)]
                if self.cover:
                    data["cover"] = self.cover
            if k == self.total_pages:
                current = 3
                if m == k:
                    current = 4
        if self.status == "done":
            current = LEGACY_TOTAL
        out: dict[str, Any] = {
            "status": self.status,
            "progress": {"total": LEGACY_TOTAL, "current": current},
            "data": data,
        }
        if self.error is not None:
            out["error"] = self.error
        return out

    def format(self, event: dict[str, Any]) -> str | None:
        """The SSE message for this event, or None when the snapshot did not change."""
        self.apply(event)
        snap = self.snapshot()
        if snap is None:
            return None
        text = json.dumps(
            absolute_image_urls(snap)
        )  # the original's Python-default JSON (", " / ": ", ASCII escapes)
        if text == self._last:
            return None
        self._last = text
        return f"id: {event['seq']}\ndata: {text}\n\n"

    def prime(self, events: list[dict[str, Any]]) -> None:
        """Fold events a resuming client already saw, without sending them again."""
        for event in events:
            self.apply(event)
        snap = self.snapshot()
        self._last = json.dumps(absolute_image_urls(snap)) if snap is not None else None


def seen_events(manager: JobManager, job_id: str, upto: int) -> list[dict[str, Any]]:
    """Events 1..upto of a job (paged: the core returns at most 500 per read)."""
    out: list[dict[str, Any]] = []
    seq = 0
    while seq < upto:
        batch = [e for e in manager.events_after(job_id, seq) if e["seq"] <= upto]
        if not batch:
            break
        out.extend(batch)
        seq = batch[-1]["seq"]
    return out


def legacy_stream(
    manager: JobManager, watcher: JobWatcher, job: dict[str, Any], *, after: int, heartbeat_s: float
) -> Iterator[str]:
    params = job.get("input") or {}
    view = LegacySnapshots(params.get("description", ""), int(params.get("pages") or 0))
    if after:
        view.prime(seen_events(manager, job["_id"], after))
    return job_event_stream(
        manager, watcher, job["_id"], after=after, formatter=view.format, heartbeat_s=heartbeat_s
    )


def rich_formatter(final_book: Callable[[], dict[str, Any] | None]) -> Callable[[dict[str, Any]], str | None]:
    """JSON API events: `event: <type>`, `id: <seq>`, `data: <the event's data>`; `done` carries the book."""

    def fmt(event: dict[str, Any]) -> str | None:
        data = event.get("data")
        if event["type"] == "done":
            data = {**(data or {}), "book": final_book()}
        return format_sse(data, event=event["type"], id=event["seq"])

    return fmt
