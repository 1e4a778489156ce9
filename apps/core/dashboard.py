"""`/dashboard/`: what participants saw, on one server-rendered page (no JavaScript, no CDN).

For the active study (or every call when none is active): participants with their condition and
per-app counts, a gallery of each participant's texts and images in the order they were made,
failures with their error, and two plots drawn here as inline SVG (latency over time per provider
and step, calls per condition). With auth on it is for admins only: it shows everyone's data.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any, Literal

from flask import Flask, Response, render_template
from flask_openapi3 import APIBlueprint
from pydantic import Field
from pymongo.database import Database

from agent.studies import PARTICIPANTS
from apps.core.query_models import QueryModel

from .auth import authenticate
from .calls import output_preview
from .context import services
from .errors import ApiError
from .svgplot import stacked_bars, time_scatter

dashboard_bp = APIBlueprint(
    "dashboard", __name__, url_prefix="/dashboard", template_folder="templates", doc_ui=False
)
_STEP_NUMBER = re.compile(r"[\s_#-]*\d+$")
WHO = {"$ifNull": ["$user", "$session"]}  # the participant of a record (agent.studies.participant_of)


class DashboardQuery(QueryModel):
    app: Literal["storybook", "ideation", "refinement", "storyteller"] | None = Field(
        None, description="only this app's calls"
    )
    participants: int = Field(50, ge=1, le=500, description="how many participants (first seen first)")
    items: int = Field(60, ge=1, le=500, description="gallery items per participant")
    failures: int = Field(50, ge=0, le=1000, description="how many recent failures to list")


def _step(step: Any) -> str:
    """'page 3' -> 'page': one plot series per kind of step, not per page."""
    return _STEP_NUMBER.sub("", str(step)) if step else "-"


def _utc(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _participants(db: Database, match: dict[str, Any], study: str | None, limit: int) -> list[dict[str, Any]]:
    rows = db.generations.aggregate(
        [
            {"$match": {**match, "$or": [{"user": {"$ne": None}}, {"session": {"$ne": None}}]}},
            {
                "$group": {
                    "_id": {"who": WHO, "app": "$app"},
                    "calls": {"$sum": 1},
                    "failed": {"$sum": {"$cond": [{"$eq": ["$ok", False]}, 1, 0]}},
                    "condition": {"$last": "$condition"},
                    "first": {"$min": "$created_at"},
                    "cost": {"$sum": {"$ifNull": ["$cost_usd", 0]}},
                }
            },
        ]
    )
    people: dict[str, dict[str, Any]] = {}
    for row in rows:
        who = str(row["_id"]["who"])
        p = people.setdefault(
            who,
            {
                "id": who,
                "apps": {},
                "calls": 0,
                "failed": 0,
                "condition": None,
                "first": None,
                "kind": None,
                "cost": 0.0,
            },
        )
        p["apps"][str(row["_id"].get("app"))] = row["calls"]
        p["calls"] += row["calls"]
        p["failed"] += row["failed"]
        p["cost"] += row["cost"]
        p["condition"] = p["condition"] or row.get("condition")
        first = _utc(row.get("first"))
        p["first"] = min(filter(None, (p["first"], first)), default=None)
    if study:
        for doc in db[PARTICIPANTS].find({"study": study}):
            if match.get("app") and doc["participant"] not in people and doc.get("app") != match["app"]:
                continue  # filtered by app: someone assigned in another app and not seen in this one
            p = people.setdefault(
                str(doc["participant"]),
                {
                    "id": str(doc["participant"]),
                    "apps": {},
                    "calls": 0,
                    "failed": 0,
                    "first": None,
                    "cost": 0.0,
                },
            )
            p["condition"], p["kind"], p["n"] = doc.get("condition"), doc.get("kind"), doc.get("n")
            p["first"] = p.get("first") or _utc(doc.get("first_seen"))
    far = datetime.max.replace(tzinfo=UTC)
    return sorted(people.values(), key=lambda p: (p.get("first") or far, p["id"]))[:limit]


def _gallery(db: Database, match: dict[str, Any], who: str, items: int) -> list[dict[str, Any]]:
    # what the participant saw: texts and pictures (moderation checks are counted, not shown)
    query = {**match, "kind": {"$ne": "moderation"}, "$or": [{"user": who}, {"user": None, "session": who}]}
    out = []
    for doc in db.generations.find(query).sort([("created_at", 1), ("_id", 1)]).limit(items):
        output = doc.get("output")
        image = output.get("image_id") if isinstance(output, dict) else None
        out.append(
            {
                "id": str(doc["_id"]),
                "kind": doc.get("kind"),
                "app": doc.get("app"),
                "step": doc.get("step"),
                "template": doc.get("template"),
                "variant": doc.get("variant"),
                "ok": doc.get("ok"),
                "condition": doc.get("condition"),
                "image": image,
                "text": None if image else output_preview(doc)[:600],
                "prompt": (doc.get("prompt") or {}).get("prompt")
                if isinstance(doc.get("prompt"), dict)
                else None,
                "at": _utc(doc.get("created_at")),
            }
        )
    return out


def dashboard_data(
    db: Database, *, study: str | None, app: str | None, participants: int, items: int, failures: int
) -> dict[str, Any]:
    """Everything the page shows (also handy in a notebook)."""
    match: dict[str, Any] = {}
    if study:
        match["study"] = study
    if app:
        match["app"] = app
    people = _participants(db, match, study, participants)
    for p in people:
        p["gallery"] = _gallery(db, match, p["id"], items)
    per_app = list(
        db.generations.aggregate(
            [
                {"$match": match},
                {
                    "$group": {
                        "_id": "$app",
                        "calls": {"$sum": 1},
                        "failed": {"$sum": {"$cond": [{"$eq": ["$ok", False]}, 1, 0]}},
                        "images": {"$sum": {"$cond": [{"$eq": ["$kind", "image"]}, 1, 0]}},
                        "who": {"$addToSet": WHO},
                    }
                },
                {"$sort": {"_id": 1}},
            ]
        )
    )
    failed = list(db.generations.find({**match, "ok": False}).sort("created_at", -1).limit(failures))
    latency: dict[str, list[tuple[datetime, float]]] = {}
    cursor = db.generations.find(
        {**match, "latency_ms": {"$type": "number"}},
        {"provider": 1, "step": 1, "kind": 1, "latency_ms": 1, "created_at": 1},
    )
    for doc in cursor.sort("created_at", -1).limit(3000):
        at = _utc(doc.get("created_at"))
        if at is not None:
            key = f"{doc.get('provider')} / {_step(doc.get('step') or doc.get('kind'))}"
            latency.setdefault(key, []).append((at, float(doc["latency_ms"])))
    by_condition: dict[str, dict[str, int]] = {}
    for row in db.generations.aggregate(
        [{"$match": match}, {"$group": {"_id": {"c": "$condition", "ok": "$ok"}, "n": {"$sum": 1}}}]
    ):
        name = str(row["_id"].get("c") or "(none)")
        by_condition.setdefault(name, {})["ok" if row["_id"].get("ok") else "failed"] = row["n"]
    return {
        "participants": people,
        "apps": [
            {
                "app": r["_id"],
                "calls": r["calls"],
                "failed": r["failed"],
                "images": r["images"],
                "participants": len([w for w in r["who"] if w is not None]),
            }
            for r in per_app
        ],
        "failures": [
            {
                "id": str(d["_id"]),
                "at": _utc(d.get("created_at")),
                "app": d.get("app"),
                "who": d.get("user") or d.get("session"),
                "kind": d.get("kind"),
                "step": d.get("step"),
                "provider": d.get("provider"),
                "condition": d.get("condition"),
                "error": (d.get("error") or {}).get("message")
                if isinstance(d.get("error"), dict)
                else d.get("error"),
            }
            for d in failed
        ],
        "latency_svg": time_scatter(latency, title="Latency per call (provider / step)", y_label="ms"),
        "conditions_svg": stacked_bars(
            dict(sorted(by_condition.items())), title="Calls per condition", y_label="calls"
        ),
    }


@dashboard_bp.get("/", doc_ui=False)
def dashboard(query: DashboardQuery) -> Response:
    """The study dashboard (HTML)."""
    svc = services()
    user = authenticate()
    if svc.settings.AUTH_MODE != "none" and (user is None or not user.is_admin):
        raise ApiError(403, "the dashboard shows every participant's data: admins only")
    assigner = svc.extras.get("study")
    study = assigner.study if assigner is not None else None
    data = dashboard_data(
        svc.db,
        study=study.name if study else None,
        app=query.app,
        participants=query.participants,
        items=query.items,
        failures=query.failures,
    )
    html = render_template("dashboard/index.html", study=study, query=query, now=datetime.now(UTC), **data)
    resp = Response(html, mimetype="text/html")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def init_dashboard(app: Flask) -> None:
    app.register_api(dashboard_bp)
