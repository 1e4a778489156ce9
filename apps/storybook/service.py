"""Storybook operations behind the routes: create a book (a job), read it, list, final output.

A book is two documents with the same id: the job (`jobs`, status + event log, run by any
worker) and the book (`storybooks`, what was made: title, sheet, pages, pictures, the
original's `final_output`). Books are kept after they finish and exported with
`flask export --app storybook`. Services take `Services` and never touch Flask globals.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

from pymongo import ASCENDING, DESCENDING
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from apps.core.context import Services
from apps.core.jobs import TERMINAL, new_job_id

from .final_output import legacy_final_output, picture_url
from .pipeline import APP, COLLECTION, BookRunner
from .s3 import S3Images, s3_images


def new_legacy_id() -> int:
    """A random 53-bit integer: JSON/JS-safe like the original's `id()` task ids, but unguessable."""
    while True:
        value = secrets.randbits(53)
        if value >= 2**32:  # never small, so it can't collide with a counter someone tries
            return value


def create_indexes(db: Database) -> None:
    books = db[COLLECTION]
    books.create_index([("owner", ASCENDING), ("created_at", DESCENDING)])
    books.create_index([("owner", ASCENDING), ("status", ASCENDING), ("finished_at", DESCENDING)])
    books.create_index("legacy_id", unique=True)


def create_book(
    svc: Services, params: dict[str, Any], *, owner: str | None, base_url: str, source: str
) -> dict[str, Any]:
    """Store the book, queue its job; returns the book document (status queued)."""
    now = datetime.now(UTC)
    for _ in range(5):
        book_id, legacy_id = new_job_id(), new_legacy_id()
        doc = {
            "_id": book_id,
            "legacy_id": legacy_id,
            "app": APP,
            "owner": owner,
            "source": source,
            "status": "queued",
            "input": params,
            "base_url": base_url,
            "title": None,
            "sheet": None,
            "seed": params.get("seed"),
            "pages": [],
            "cover": None,
            "error": None,
            "final_output": None,
            "created_at": now,
            "started_at": None,
            "finished_at": None,
        }
        try:
            svc.db[COLLECTION].insert_one(doc)
            break
        except DuplicateKeyError:  # a 53-bit collision: draw again
            continue
    else:  # pragma: no cover - five 53-bit collisions in a row
        raise RuntimeError("could not allocate a task id")
    runner = BookRunner(svc, book_id, params, owner, base_url)
    svc.jobs.submit(
        kind="storybook",
        app=APP,
        runner=runner,
        owner=owner,
        input=params,
        job_id=book_id,
        extra={"legacy_id": legacy_id},
        total=2 * int(params["pages"]) + 2,
    )
    return doc


def job_by_legacy_id(svc: Services, task_id: int) -> dict[str, Any] | None:
    if not 0 <= task_id < 2**63:
        return None
    return svc.jobs.find_one({"app": APP, "legacy_id": task_id})


def book_doc(svc: Services, book_id: str) -> dict[str, Any] | None:
    return svc.db[COLLECTION].find_one({"_id": book_id})


def effective_status(book: dict[str, Any], job: dict[str, Any] | None) -> tuple[str, Any]:
    """The job's status is the truth (a reaped job never updated its book)."""
    if job is not None and (job["status"] in TERMINAL or book.get("status") not in TERMINAL):
        error = book.get("error") if book.get("error") else job.get("error")
        return job["status"], error
    return book.get("status", "queued"), book.get("error")


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def links(book_id: str, legacy_id: int, prefix: str) -> dict[str, str]:
    return {
        "self": f"{prefix}/books/{book_id}",
        "events": f"{prefix}/books/{book_id}/events",
        "legacy_events": f"{prefix}/get_updates/{legacy_id}",
        "cancel": f"/jobs/{book_id}",
        "job": f"/jobs/{book_id}",
    }


def public_book(
    book: dict[str, Any],
    job: dict[str, Any] | None,
    *,
    prefix: str = "/storybook",
    s3: S3Images | None = None,
) -> dict[str, Any]:
    """The JSON view of a book (absolute picture URLs; freshly signed S3 URLs when S3 is on)."""
    base = book.get("base_url") or None  # "" (stored: relative URLs) -> this answer's host
    status, error = effective_status(book, job)

    params = book.get("input") or {}
    cover = book.get("cover") or {}
    return {
        "id": book["_id"],
        "legacy_id": book.get("legacy_id"),
        "status": status,
        "owner": book.get("owner"),
        "title": book.get("title"),
        "description": params.get("description"),
        "pages_requested": params.get("pages"),
        "params": {k: v for k, v in params.items() if k not in ("description", "pages")},
        "sheet": book.get("sheet"),
        "seed": book.get("seed"),
        "pages": [
            {
                "page": pg.get("page"),
                "text": pg.get("text"),
                "summary": pg.get("summary"),
                "image_description": pg.get("scene"),
                "image_prompt": pg.get("image_prompt"),
                "illustration": picture_url(pg, base, s3),
                "instance": pg.get("instance"),
            }
            for pg in book.get("pages") or []
        ],
        "cover": (
            {
                "illustration": picture_url(cover, base, s3),
                "image_prompt": book.get("cover_prompt"),
                "instance": cover.get("instance"),
            }
            if cover.get("image_id")
            else None
        ),
        "progress": (job or {}).get("progress"),
        "error": error,
        "created_at": _iso(book.get("created_at")),
        "started_at": _iso(book.get("started_at")),
        "finished_at": _iso(book.get("finished_at")),
        "links": links(book["_id"], book.get("legacy_id", 0), prefix),
    }


def history(svc: Services, owner: str | None, *, limit: int, status: str | None) -> list[dict[str, Any]]:
    query: dict[str, Any] = {"owner": owner}
    if status:
        query["status"] = status
    rows = svc.db[COLLECTION].find(query, {"pages.text": 0}).sort("created_at", DESCENDING).limit(limit)
    out = []
    s3 = s3_images(svc)
    for doc in rows:
        out.append(
            {
                "id": doc["_id"],
                "legacy_id": doc.get("legacy_id"),
                "title": doc.get("title"),
                "status": doc.get("status"),
                "description": (doc.get("input") or {}).get("description"),
                "pages": (doc.get("input") or {}).get("pages"),
                "cover": picture_url(doc.get("cover") or {}, doc.get("base_url") or None, s3),
                "created_at": _iso(doc.get("created_at")),
                "finished_at": _iso(doc.get("finished_at")),
            }
        )
    return out


def final_output_of(book: dict[str, Any], s3: S3Images | None = None) -> dict[str, Any]:
    """Built from the book each time, so S3 URLs are signed afresh (the stored copy is the record)."""
    return legacy_final_output(book, s3=s3)


def latest_finished(svc: Services, owner: str | None) -> dict[str, Any] | None:
    return svc.db[COLLECTION].find_one({"owner": owner, "status": "done"}, sort=[("finished_at", DESCENDING)])
