"""Stored refinement documents shaped for the JSON API (history and version trees).

Pure functions of a document and the public base URL: image ids become absolute image URLs,
datetimes ISO strings, our snake_case fields the contract's camelCase ones.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from apps.core.storage import absolute_image_url

USER_FIELDS = (
    "username",
    "currentStage",
    "designTask",
    "rapidDivergenceSchemes",
    "deepDivergenceSchemes",
    "convergenceSchemes",
)
# the fields of a request listed in GET /sessions/<id> (the rest is in GET /requests/<id>)
REQUEST_SUMMARY_FIELDS = (
    "id",
    "type",
    "stage",
    "status",
    "error",
    "stimulusIds",
    "durationMs",
    "createdAt",
    "attribution",
)


def iso(value: Any) -> str | None:
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.isoformat().replace("+00:00", "Z")
    return value


def public_user(doc: dict[str, Any], fresh: dict[str, Any], session_id: str) -> dict[str, Any]:
    """The original's /paint/start data (arrays never null) plus our session id."""
    out: dict[str, Any] = {"_id": str(doc["_id"])}
    for key in USER_FIELDS:
        value = doc.get(key, fresh.get(key))
        if key.endswith("Schemes") and not isinstance(value, list):
            value = []
        out[key] = value
    out["sessionId"] = session_id
    return out


def history_item(stored: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    image_id = stored.get("image_id")
    combos = stored.get("combinations")
    return {
        "type": stored["type"],
        "text": stored.get("text"),
        "imageId": image_id,
        "imageUrl": absolute_image_url(image_id, base_url) if image_id else None,
        "combinations": [history_item(c, base_url) for c in combos] if combos is not None else None,
    }


def public_stimulus(doc: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    images = []
    for img in doc.get("images") or []:
        images.append(
            {
                **{k: v for k, v in img.items() if k != "id"},
                "imageId": img["id"],
                "imageUrl": absolute_image_url(img["id"], base_url),
            }
        )
    return {
        "id": str(doc["_id"]),
        "requestId": doc["request_id"],
        "username": doc.get("username"),
        "sessionId": doc.get("session"),
        "attribution": doc.get("attribution", "anonymous"),
        "type": doc["gen_type"],
        "stage": doc["stage"],
        "index": doc.get("index", 0),
        "creativeType": doc.get("creative_type"),
        "displayType": doc.get("display_type"),
        "items": [history_item(i, base_url) for i in doc.get("items") or []],
        "result": doc.get("result"),
        "texts": doc.get("texts") or {},
        "images": images,
        "provenance": doc.get("provenance") or {},
        "language": doc.get("language", ""),
        "createdAt": iso(doc.get("created_at")),
    }


def public_request(doc: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    return {
        "id": str(doc["_id"]),
        "username": doc.get("username"),
        "sessionId": doc.get("session"),
        "attribution": doc.get("attribution"),
        "type": doc.get("gen_type"),
        "stage": doc.get("stage"),
        "language": doc.get("language"),
        "status": doc.get("status"),
        "error": doc.get("error"),
        "input": doc.get("input"),
        "sketches": [
            {"imageId": i, "imageUrl": absolute_image_url(i, base_url)} for i in doc.get("sketch_ids") or []
        ],
        "steps": doc.get("steps") or [],
        "stimulusIds": doc.get("stimulus_ids") or [],
        "imageIds": doc.get("image_ids") or [],
        "durationMs": doc.get("duration_ms"),
        "createdAt": iso(doc.get("created_at")),
        "finishedAt": iso(doc.get("finished_at")),
    }


def request_summary(doc: dict[str, Any], base_url: str | None) -> dict[str, Any]:
    return {k: v for k, v in public_request(doc, base_url).items() if k in REQUEST_SUMMARY_FIELDS}


def session_summary(
    session: dict[str, Any], request_counts: dict[str, dict[str, int]], stimulus_counts: dict[str, int]
) -> dict[str, Any]:
    """A session with its request (done/failed), stimulus and save counts."""
    counts = request_counts.get(session["_id"], {})
    return {
        "sessionId": session["_id"],
        "username": session["username"],
        "createdAt": iso(session.get("created_at")),
        "lastSeenAt": iso(session.get("last_seen_at")),
        "requests": sum(counts.values()),
        "failedRequests": counts.get("failed", 0),
        "stimuli": stimulus_counts.get(session["_id"], 0),
        "saves": session.get("saves", 0),
    }


def public_version(doc: dict[str, Any], base_url: str | None, image: str | None = None) -> dict[str, Any]:
    return {
        "id": doc["_id"],
        "parentId": doc.get("parent"),
        "rootId": doc["root"],
        "stimulusId": doc.get("stimulus_id"),
        "op": doc["op"],
        "depth": doc.get("depth", 0),
        "prompt": doc.get("prompt"),
        "negativePrompt": doc.get("negative_prompt"),
        "params": doc.get("params") or {},
        "imageUrl": absolute_image_url(doc["_id"], base_url),
        "image": image,
        "createdAt": iso(doc.get("created_at")),
    }
