"""`flask export`: a study's data as JSONL (+ CSV) plus the images as files.

    flask export --app storybook [--user alice] [--since 2026-11-01] --out ./export-storybook

writes into OUT:
- `<collection>.jsonl`: one MongoDB Extended JSON document per line (lossless: ids, dates);
- `<collection>.csv`: the same rows, one column per top-level field, nested values as JSON text;
- `images/<id>.<ext>` and `images.jsonl` (each image's GridFS metadata);
- `manifest.json`: what was asked for, when, and how many documents each file holds.

Collections: `generations` (every model call) and `jobs` filtered by app (+ user), the events of
those jobs, plus every collection an app registered with `register_export_collection`.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
import gridfs
from bson import ObjectId, json_util
from flask import Flask
from pymongo.database import Database

from config import APP_NAMES

from .context import services


@dataclass(frozen=True)
class ExportCollection:
    """How to select one app's (and one user's) documents of a collection."""

    owner_app: str | None  # the collection belongs to this app only (None: shared, filtered by app_field)
    app_field: str | None  # field holding the app name, for shared collections
    user_field: str | None  # field holding the user name (None: the user filter does not apply)
    time_field: str = "created_at"


_COLLECTIONS: dict[str, ExportCollection] = {
    "generations": ExportCollection(None, "app", "user"),
    "jobs": ExportCollection(None, "app", "owner"),
}
_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


def register_export_collection(
    collection: str, app_name: str, user_field: str | None = "user", time_field: str = "created_at"
) -> None:
    """Apps call this for their own collections so `flask export --app` includes them."""
    _COLLECTIONS[collection] = ExportCollection(app_name, None, user_field, time_field)


def _since_filter(field: str, since: datetime) -> dict[str, Any]:
    """Documents from `since` on; a document without the time field counts by its ObjectId's time."""
    return {
        "$or": [
            {field: {"$gte": since}},
            {field: {"$exists": False}, "_id": {"$gte": _oid_at(since)}},
        ]
    }


def _oid_at(moment: datetime) -> ObjectId:
    """The smallest ObjectId made at `moment` (clamped to the 32-bit seconds an ObjectId can hold)."""
    seconds = moment.timestamp()
    if seconds < 0:
        return ObjectId("0" * 24)
    if seconds >= 2**32:
        return ObjectId("f" * 24)
    return ObjectId.from_datetime(moment)


def _query(spec: ExportCollection, app: str, user: str | None, since: datetime | None) -> dict[str, Any]:
    query: dict[str, Any] = {spec.app_field: app} if spec.app_field else {}
    if user and spec.user_field:
        query[spec.user_field] = user
    if since:
        query.update(_since_filter(spec.time_field, since))
    return query


def export_study(
    db: Database, out: Path, *, app: str, user: str | None = None, since: datetime | None = None
) -> dict[str, int]:
    """Write one app's data to `out`; returns {file stem: document count}. No Flask needed."""
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    job_ids: list[Any] = []
    for name, spec in _COLLECTIONS.items():
        if spec.owner_app is not None and spec.owner_app != app:
            continue
        if spec.user_field is None and user:
            continue  # a per-app collection without users: it can't be narrowed to one user, so leave it out
        cursor = db[name].find(_query(spec, app, user, since)).sort("_id", 1)
        counts[name] = _write(out, name, cursor, ids=job_ids if name == "jobs" else None)
    if job_ids:
        cursor = db.job_events.find({"job": {"$in": job_ids}}).sort([("job", 1), ("seq", 1)])
        counts["job_events"] = _write(out, "job_events", cursor)
    counts["images"] = _export_images(db, out, app=app, user=user, since=since)
    manifest = {
        "app": app,
        "user": user,
        "since": since.isoformat() if since else None,
        "exported_at": datetime.now(UTC).isoformat(),
        "counts": counts,
    }
    (out / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return counts


def _write(out: Path, name: str, cursor: Any, ids: list[Any] | None = None) -> int:
    """Stream the cursor to `<name>.jsonl`, then write `<name>.csv` from that file (same rows)."""
    columns: dict[str, None] = {}
    n = 0
    jsonl = out / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for row in cursor:
            fh.write(json_util.dumps(row, ensure_ascii=False) + "\n")
            columns.update(dict.fromkeys(row))
            if ids is not None:
                ids.append(row["_id"])
            n += 1
    with (
        open(jsonl, encoding="utf-8") as src,
        open(out / f"{name}.csv", "w", newline="", encoding="utf-8") as dst,
    ):
        writer = csv.writer(dst, quoting=csv.QUOTE_ALL)
        writer.writerow(list(columns))
        for line in src:
            row = json_util.loads(line)
            writer.writerow([_flat(row.get(c)) for c in columns])
    return n


def _export_images(db: Database, out: Path, *, app: str, user: str | None, since: datetime | None) -> int:
    query: dict[str, Any] = {"metadata.app": app}
    if user:
        query["metadata.user"] = user
    if since:
        query["uploadDate"] = {"$gte": since}
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    bucket = gridfs.GridFSBucket(db, bucket_name="images")
    n = 0
    with open(out / "images.jsonl", "w", encoding="utf-8") as fh:
        for doc in db["images.files"].find(query).sort("uploadDate", 1):
            ext = str(doc.get("filename") or "x.png").rsplit(".", 1)[-1]
            filename = _SAFE_NAME.sub("_", f"{doc['_id']}.{ext}")
            try:
                data = bucket.open_download_stream(doc["_id"]).read()
            except gridfs.errors.NoFile:  # a file document whose chunks are gone: list it, write nothing
                doc["missing"] = True
            else:
                (images_dir / filename).write_bytes(data)
                doc["file"] = f"images/{filename}"
            fh.write(json_util.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    return n


def _flat(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    return "" if value is None else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value)


def parse_since(value: str) -> datetime:
    """ISO date or date-time; without a zone it means UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not an ISO date (e.g. 2026-11-01 or 2026-11-01T09:00)", param_hint="--since"
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def register_cli(app: Flask) -> None:
    @app.cli.command("export")
    @click.option("--app", "app_name", required=True, type=click.Choice(APP_NAMES), help="which app's data")
    @click.option("--user", default=None, help="only this user's data")
    @click.option("--since", default=None, help="ISO date, e.g. 2026-11-01 (UTC unless a zone is given)")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
    def export(app_name: str, user: str | None, since: str | None, out: Path) -> None:
        """Write a study's data (JSONL + CSV) and its images to OUT."""
        since_dt = parse_since(since) if since else None
        counts = export_study(services().db, out, app=app_name, user=user, since=since_dt)
        for name, count in counts.items():
            click.echo(f"{name}: {count}")
        click.echo(f"written to {out}")
