"""`flask export`: a study's data as JSONL (+ CSV for flat collections) plus the images as files."""

from __future__ import annotations

import csv
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import click
from bson import json_util
from flask import Flask
from pymongo.database import Database

from .context import services

# collection -> (field holding the app name or None when the collection belongs to one app, user field)
_COLLECTIONS: dict[str, tuple[str | None, str | None, str | None]] = {
    "generations": (None, "app", "user"),
    "jobs": (None, "app", "owner"),
}


def register_export_collection(collection: str, app_name: str, user_field: str | None = "user") -> None:
    """Apps call this for their own collections so `flask export --app` includes them."""
    _COLLECTIONS[collection] = (app_name, None, user_field)


def export_study(db: Database, out: Path, *, app: str, user: str | None = None,
                 since: datetime | None = None) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}
    for name, (owner_app, app_field, user_field) in _COLLECTIONS.items():
        if owner_app is not None and owner_app != app:
            continue
        query: dict[str, Any] = {app_field: app} if app_field else {}
        if user and user_field:
            query[user_field] = user
        if since:
            query["created_at"] = {"$gte": since}
        rows = list(db[name].find(query))
        counts[name] = len(rows)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as fh:
            for row in rows:
                fh.write(json_util.dumps(row, ensure_ascii=False) + "\n")
        _write_csv(out / f"{name}.csv", rows)
    image_query: dict[str, Any] = {"metadata.app": app}
    if user:
        image_query["metadata.user"] = user
    if since:
        image_query["uploadDate"] = {"$gte": since}
    images_dir = out / "images"
    images_dir.mkdir(exist_ok=True)
    store = services().images
    n = 0
    with open(out / "images.jsonl", "w", encoding="utf-8") as fh:
        for doc in db["images.files"].find(image_query):
            ext = doc.get("filename", "x.png").rsplit(".", 1)[-1]
            (images_dir / f"{doc['_id']}.{ext}").write_bytes(store.load(doc["_id"]))
            fh.write(json_util.dumps(doc, ensure_ascii=False) + "\n")
            n += 1
    counts["images"] = n
    return counts


def _flat(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, default=str)
    return "" if value is None else str(value)


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, quoting=csv.QUOTE_ALL)
        writer.writerow(columns)
        for row in rows:
            writer.writerow([_flat(row.get(c)) for c in columns])


def register_cli(app: Flask) -> None:
    @app.cli.command("export")
    @click.option("--app", "app_name", required=True, help="storybook | ideation | refinement | storyteller")
    @click.option("--user", default=None)
    @click.option("--since", default=None, help="ISO date, e.g. 2026-11-01")
    @click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path))
    def export(app_name: str, user: str | None, since: str | None, out: Path) -> None:
        """Write a study's data (JSONL + CSV) and its images to OUT."""
        since_dt = datetime.fromisoformat(since).replace(tzinfo=UTC) if since else None
        counts = export_study(services().db, out, app=app_name, user=user, since=since_dt)
        for name, count in counts.items():
            click.echo(f"{name}: {count}")
