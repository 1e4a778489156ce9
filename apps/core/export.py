"""`flask export`: a study's data as JSONL (+ CSV) plus the images as files.

    flask export --app storybook [--user alice] [--session S] [--since 2026-11-01] [--until 2026-11-08]
                 [--condition warm] --out ./export-storybook

writes into OUT:
- `<collection>.jsonl`: one MongoDB Extended JSON document per line (lossless: ids, dates);
- `<collection>.csv`: the same rows, one column per top-level field, nested values as JSON text;
- `images/<id>.<ext>`, `images.jsonl` (each image's GridFS metadata) and `images.csv` (one row per
  image with what its generation record says: template, sha256, sampler, steps, seed, checkpoint,
  instance, study, condition);
- `manifest.json`: what was asked for, when, and how many documents each file holds.

Dates in the CSV are ISO 8601 with their zone (UTC). Generation rows get prompt/completion/total
tokens and, with a price table (MODEL_PRICES), `cost_usd`. On a terminal a progress line goes to
stderr. Collections: `generations` (every model call) and `jobs` filtered by app (+ user), the events of
those jobs, plus every collection an app added to the export catalog (`services.exports`, apps/core/export_catalog.py).
"""

from __future__ import annotations

import csv
import json
import re
import sys
from collections.abc import Callable
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
from .export_catalog import ExportCatalog, ExportCollection
from .export_rows import (
    IMAGE_COLUMNS,
    Progress,
    condition_filter,
    generation_row,
    image_records,
    image_row,
    session_filter,
    time_filter,
    utc,
)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")


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


@dataclass(frozen=True)
class StudyFilters:
    """The study-era filters, all optional: one session, an end time (exclusive), one condition."""

    session: str | None = None
    until: datetime | None = None
    condition: str | None = None
    study: str | None = None  # whose participants --condition means (default: any study)

    def narrow(
        self, db: Database, name: str, spec: ExportCollection, query: dict[str, Any]
    ) -> dict[str, Any]:
        parts = [query]
        if self.session:
            parts.append(session_filter(self.session))
        if self.until:
            parts.append(time_filter(spec.time_field, None, self.until))
        if self.condition:
            own = name in ("generations", "jobs")
            parts.append(condition_filter(db, self.condition, self.study, spec.user_field, own))
        return parts[0] if len(parts) == 1 else {"$and": parts}


def export_study(
    db: Database,
    out: Path,
    *,
    app: str,
    catalog: ExportCatalog,
    user: str | None = None,
    since: datetime | None = None,
    filters: StudyFilters | None = None,
    prices: dict[str, Any] | None = None,
    progress: bool = False,
) -> dict[str, int]:
    """Write one app's data to `out`; returns {file stem: document count}. No Flask needed."""
    out.mkdir(parents=True, exist_ok=True)
    filters = filters or StudyFilters()
    bar = Progress(progress)
    counts: dict[str, int] = {}
    job_ids: list[Any] = []
    for name, spec in catalog.items():
        if spec.owner_app is not None and spec.owner_app != app:
            continue
        if spec.user_field is None and (user or filters.condition):
            continue  # a per-app collection without users: it can't be narrowed to one user, so leave it out
        query = filters.narrow(db, name, spec, _query(spec, app, user, since))
        total = db[name].count_documents(query) if progress else None
        cursor = db[name].find(query).sort("_id", 1)
        transform = generation_row(prices or {}) if name == "generations" else None
        counts[name] = _write(
            out, name, cursor, ids=job_ids if name == "jobs" else None, transform=transform,
            tick=lambda n, name=name, total=total: bar.update(name, n, total),
        )  # fmt: skip
        bar.update(name, counts[name], total, final=True)
    if job_ids:
        cursor = db.job_events.find({"job": {"$in": job_ids}}).sort([("job", 1), ("seq", 1)])
        counts["job_events"] = _write(out, "job_events", cursor)
    counts["images"] = _export_images(db, out, app=app, user=user, since=since, filters=filters, bar=bar)
    manifest = {
        "app": app,
        "user": user,
        "since": since.isoformat() if since else None,
        "until": filters.until.isoformat() if filters.until else None,
        "session": filters.session,
        "condition": filters.condition,
        "study": filters.study,
        "exported_at": datetime.now(UTC).isoformat(),
        "counts": counts,
    }
    (out / "manifest.json").write_text(
        json.dumps(manifest, ensure_ascii=False, indent=2) + "\n", encoding="utf-8"
    )
    return counts


def _write(
    out: Path,
    name: str,
    cursor: Any,
    ids: list[Any] | None = None,
    transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
    tick: Callable[[int], None] | None = None,
) -> int:
    """Stream the cursor to `<name>.jsonl`, then write `<name>.csv` from that file (same rows)."""
    columns: dict[str, None] = {}
    n = 0
    jsonl = out / f"{name}.jsonl"
    with open(jsonl, "w", encoding="utf-8") as fh:
        for row in cursor:
            if transform is not None:
                row = transform(row)
            if tick is not None:
                tick(n)
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


def _export_images(
    db: Database,
    out: Path,
    *,
    app: str,
    user: str | None,
    since: datetime | None,
    filters: StudyFilters | None = None,
    bar: Progress | None = None,
) -> int:
    filters = filters or StudyFilters()
    query: dict[str, Any] = {"metadata.app": app}
    if user:
        query["metadata.user"] = user
    if since or filters.until:
        query.update(time_filter("uploadDate", since, filters.until))
    if filters.session:
        query["metadata.session"] = filters.session
    records = image_records(db, [d["_id"] for d in db["images.files"].find(query, {"_id": 1})])
    rows: list[dict[str, Any]] = []
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    bucket = gridfs.GridFSBucket(db, bucket_name="images")
    n = 0
    with open(out / "images.jsonl", "w", encoding="utf-8") as fh:
        for doc in db["images.files"].find(query).sort("uploadDate", 1):
            rec = records.get(str(doc["_id"]))
            if filters.condition and (rec or {}).get("condition") != filters.condition:
                continue
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
            rows.append(image_row(doc, rec))
            n += 1
            if bar is not None:
                bar.update("images", n, None)
    with open(out / "images.csv", "w", newline="", encoding="utf-8") as dst:
        writer = csv.writer(dst, quoting=csv.QUOTE_ALL)
        writer.writerow(IMAGE_COLUMNS)
        for row in rows:
            writer.writerow([_flat(row.get(c)) for c in IMAGE_COLUMNS])
    if bar is not None:
        bar.update("images", n, n, final=True)
    return n


def _flat(value: Any) -> str:
    if isinstance(value, datetime):
        return utc(value).isoformat()
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=_json_default)
    return "" if value is None else str(value)


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return utc(value).isoformat()
    return str(value)


def parse_since(value: str, hint: str = "--since") -> datetime:
    """ISO date or date-time; without a zone it means UTC."""
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not an ISO date (e.g. 2026-11-01 or 2026-11-01T09:00)", param_hint=hint
        ) from exc
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


def register_cli(app: Flask) -> None:
    @app.cli.command("export")
    @click.option("--app", "app_name", required=True, type=click.Choice(APP_NAMES), help="which app's data")
    @click.option("--user", default=None, help="only this user's data")
    @click.option(
        "--session", default=None, help="only this session's data (auth off: storyteller participants)"
    )
    @click.option("--since", default=None, help="ISO date, e.g. 2026-11-01 (UTC unless a zone is given)")
    @click.option(
        "--until", default=None, help="ISO date or date-time, exclusive (UTC unless a zone is given)"
    )
    @click.option("--condition", default=None, help="only participants of this study condition")
    @click.option("--study", default=None, help="the study --condition refers to (default: the active STUDY)")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
    def export(
        app_name: str,
        user: str | None,
        session: str | None,
        since: str | None,
        until: str | None,
        condition: str | None,
        study: str | None,
        out: Path,
    ) -> None:
        """Write a study's data (JSONL + CSV) and its images to OUT."""
        since_dt = parse_since(since) if since else None
        until_dt = parse_since(until, "--until") if until else None
        svc = services()
        filters = StudyFilters(session=session, until=until_dt, condition=condition,
                               study=study or svc.settings.STUDY or None)  # fmt: skip
        counts = export_study(
            svc.db, out, app=app_name, catalog=svc.exports, user=user, since=since_dt, filters=filters,
            prices=svc.extras.get("prices"), progress=sys.stderr.isatty(),
        )  # fmt: skip
        for name, count in counts.items():
            click.echo(f"{name}: {count}")
        click.echo(f"written to {out}")
