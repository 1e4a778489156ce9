"""StepIdeator's use cases: a /generate call's stored record (operations.py does the work),
uploads, time records, the saved workspace and a participant's history.

Fixes over the original: each request uses *its own* uploaded sketch (stored per user in
GridFS) instead of one shared file; the product's name comes from the design task
(template `ideation/mainbody`, cached per task) instead of a hard-coded "agricultural
drone"; checkpoints are routed through the pool's model affinity; a failed generation is an
error, never a 0-byte image; everything a participant did or saw is stored.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

from pymongo.database import Database

from agent.types import ModelError
from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.image_refs import read_image_ref
from apps.core.jobs import holding, lease_fields
from apps.core.storage import (
    absolute_image_url,
    absolute_image_urls,
    decode_base64_image,
    relative_image_urls,
)

from . import labels
from .attribution import claim_uploads, participant_of
from .generation import APP, Generation
from .operations import Operations

EXPORTED = ("ideation_requests", "ideation_users", "ideation_time_records")  # by "username"
# a request is stored `working` while it runs in its worker; if that worker dies, the reaper fails it
LEASED = "ideation_requests"


def create_indexes(db: Database) -> None:
    db.ideation_requests.create_index([("username", 1), ("created_at", -1)])
    db.ideation_users.create_index("username", unique=True)
    db.ideation_time_records.create_index([("username", 1), ("received_at", -1)])
    # attribution.py: find a browser's latest named request, and its ownerless uploads
    db.ideation_requests.create_index([("client_key", 1), ("created_at", -1)])
    db.ideation_time_records.create_index([("client_key", 1), ("received_at", -1)])
    db["images.files"].create_index([("metadata.client_key", 1), ("uploadDate", -1)])
    db.ideation_mainbody.create_index("created_at")


class IdeationService:
    def __init__(self, svc: Services, base_url: str) -> None:
        self.svc = svc
        self.db = svc.db
        self.settings = svc.settings
        self.base_url = base_url

    # ------------------------------------------------------------------ entry point
    def generate(self, body: Any, username: str, client: str | None = None) -> Any:
        info = body.selectedButtonInfo
        op = labels.resolve_operation(info.aiStage, info.buttonText)
        if op is None:
            raise BusinessException(1, labels.MSG_INVALID_TASK)
        task = (body.designTask or "").strip()
        if not task:
            raise BusinessException(1, labels.MSG_TASK_MISSING)
        num = body.currentNum
        if num == 0:
            raise BusinessException(1, labels.MSG_NUM_MISSING)
        limit = self.settings.IDEATION_MAX_NUM
        if num > limit:
            raise BusinessException(1, f"currentNum must be between 1 and {limit}", status=422)
        if op in ("brief.extend", "sketch.reference"):
            num = 1  # the UI forces 1 for these buttons
        if client and self.settings.AUTH_MODE == "none":
            claim_uploads(self.db, APP, client, username)
        canvas, canvas_id = self._canvas(body.selectedCanvasRecords or [], username)
        gen = Generation(
            username=username,
            task=task,
            op=op,
            num=num,
            texts=list(body.selectedTexts or []),
            current_stage=labels.resolve_stage(body.currentStage),
            canvas=canvas,
            canvas_image_id=canvas_id,
        )
        started = time.perf_counter()
        record = {
            "_id": gen.request_id,
            "username": username,
            "op": op,
            "buttonText": info.buttonText,
            "aiStage": info.aiStage,
            "currentAIStage": body.currentAIStage,
            "currentStage": body.currentStage,
            "designTask": task,
            "num": num,
            "selectedTexts": gen.texts,
            "canvas_image_id": canvas_id,
            "created_at": datetime.now(UTC),
            "status": "working",
            "client_key": client,
            **lease_fields(self.svc.jobs),
        }
        self.db.ideation_requests.insert_one(record)
        try:
            with holding(self.svc.jobs, "ideation_requests", gen.request_id):
                data = Operations(self.svc, self.base_url).run(gen)
        except BusinessException as exc:
            if exc.status < 500:  # refused (wrong stage, missing canvas...): it leaves nothing behind
                self._discard(gen, new_canvas=canvas_id is not None and not self._is_reference(body))
                raise
            self._failed(gen, exc, started)
            raise
        except ModelError as exc:
            self._failed(gen, exc, started)
            raise
        self.db.ideation_requests.update_one(
            {"_id": gen.request_id},
            {
                "$set": {
                    # stored with server-relative image URLs: the Host header this answer used is the client's
                    "status": "done",
                    "data": relative_image_urls(data, self.base_url),
                    "image_ids": gen.image_ids,
                    "texts": gen.texts_out,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                },
                "$unset": {"lease_until": ""},
            },
        )
        return data

    @staticmethod
    def _is_reference(body: Any) -> bool:
        records = body.selectedCanvasRecords or []
        return bool(records) and isinstance(records[0], str) and not records[0].startswith("data:")

    def _discard(self, gen: Generation, *, new_canvas: bool) -> None:
        """Undo a refused request: its record and the images it stored (not a canvas it only referenced)."""
        self.db.ideation_requests.delete_one({"_id": gen.request_id})
        for image_id in [
            *gen.image_ids,
            *([gen.canvas_image_id] if new_canvas and gen.canvas_image_id else []),
        ]:
            self.svc.images.delete(image_id)

    def _failed(self, gen: Generation, exc: Exception, started: float) -> None:
        self.db.ideation_requests.update_one(
            {"_id": gen.request_id},
            {
                "$set": {
                    "status": "failed",
                    "error": getattr(exc, "message", str(exc)),
                    "image_ids": gen.image_ids,
                    "latency_ms": (time.perf_counter() - started) * 1000,
                },
                "$unset": {"lease_until": ""},
            },
        )

    # ------------------------------------------------------------------ inputs
    def _canvas(self, records: list[str], username: str) -> tuple[bytes | None, str | None]:
        """The selected canvas: an uploaded image's URL (resolved to *that* upload) or a data URL."""
        if not records:
            return None, None
        ref = records[0]
        if not isinstance(ref, str) or not ref.strip():
            raise BusinessException(1, labels.MSG_IMAGE_MISSING)
        found = read_image_ref(self.svc, ref)  # the caller's own image (or admin), else a plain 404
        if found is not None:
            return found[1], found[0].id
        if ref.startswith("data:image"):
            data = decode_base64_image(ref, field="selectedCanvasRecords[0]")
            image_id = self.svc.images.save(data, app=APP, user=username or None, kind="canvas")
            return data, image_id
        raise BusinessException(
            1, "selectedCanvasRecords[0] must be a URL returned by /upload or a data URL", status=422
        )

    # ------------------------------------------------------------------ uploads, timings, state
    def upload(
        self,
        data: bytes,
        filename: str,
        username: str | None,
        kind: str,
        *,
        source: str | None = None,
        client: str | None = None,
    ) -> str:
        """Store an upload; with no stated owner (auth off, no `username`) link it by `client` (attribution.py)."""
        if not username and client and self.settings.AUTH_MODE == "none":
            username = participant_of(self.db, client)
            source = "client" if username else None
        image_id = self.svc.images.save(
            data,
            app=APP,
            user=username or None,
            kind=kind,
            filename=filename,
            user_source=source if username else None,
            client_key=client,
        )
        return absolute_image_url(image_id, self.base_url)

    def time_record(self, body: Any, client: str | None = None) -> None:
        doc = body.model_dump()
        doc["received_at"] = datetime.now(UTC)
        doc["client_key"] = client
        self.db.ideation_time_records.insert_one(doc)
        if client and self.settings.AUTH_MODE == "none":
            claim_uploads(self.db, APP, client, body.username)

    def paint_start(self, username: str) -> dict[str, Any]:
        now = datetime.now(UTC)
        self.db.ideation_users.update_one(
            {"username": username},
            {
                "$setOnInsert": {
                    "username": username,
                    "designTask": "",
                    "currentStage": labels.STAGE_NOT_READY,
                    "designBriefSchemes": [],
                    "sketchSchemes": [],
                    "modelImageSchemes": [],
                    "renderingSchemes": [],
                    "created_at": now,
                },
                "$set": {"last_seen_at": now},
            },
            upsert=True,
        )
        return _public_user(self.db.ideation_users.find_one({"username": username}) or {})

    def user_state(self, username: str) -> dict[str, Any] | None:
        """The saved workspace, read only (a GET must not count as a visit)."""
        doc = self.db.ideation_users.find_one({"username": username})
        return _public_user(doc) if doc is not None else None

    STAGE_FIELDS = {
        labels.STAGE_BRIEF: "designBriefSchemes",
        labels.STAGE_SKETCH: "sketchSchemes",
        labels.STAGE_MODEL: "modelImageSchemes",
        labels.STAGE_RENDERING: "renderingSchemes",
    }

    def paint_save(self, username: str, data: dict[str, Any]) -> None:
        schemes = data.get("designSchemes") or {}
        if not isinstance(schemes, dict):
            raise BusinessException(1, "data.designSchemes must be an object keyed by stage", status=422)
        update: dict[str, Any] = {"saved_at": datetime.now(UTC)}
        for stage, field_name in self.STAGE_FIELDS.items():
            value = schemes.get(stage)
            if value is not None:
                if not isinstance(value, list):
                    raise BusinessException(1, f"data.designSchemes[{stage}] must be a list", status=422)
                update[field_name] = value
        for key in ("designTask", "currentStage"):
            if isinstance(data.get(key), str):
                update[key] = data[key]
        result = self.db.ideation_users.update_one({"username": username}, {"$set": update})
        if result.matched_count == 0:
            raise BusinessException(1, "用户不存在", status=404)

    def history(self, username: str, limit: int) -> dict[str, Any]:
        requests = []
        for doc in self.db.ideation_requests.find({"username": username}).sort("created_at", -1).limit(limit):
            requests.append(
                {
                    "id": doc["_id"],
                    "op": doc.get("op"),
                    "buttonText": doc.get("buttonText"),
                    "aiStage": doc.get("aiStage"),
                    "designTask": doc.get("designTask"),
                    "num": doc.get("num"),
                    "status": doc.get("status"),
                    "error": doc.get("error"),
                    "data": absolute_image_urls(doc.get("data"), self.base_url),
                    "images": [absolute_image_url(i, self.base_url) for i in doc.get("image_ids", [])],
                    "canvas": absolute_image_url(doc["canvas_image_id"], self.base_url)
                    if doc.get("canvas_image_id")
                    else None,
                    "created_at": doc["created_at"].isoformat() if doc.get("created_at") else None,
                    "latency_ms": doc.get("latency_ms"),
                }
            )
        timings = [
            {k: v for k, v in t.items() if k != "_id"} | {"received_at": t["received_at"].isoformat()}
            for t in self.db.ideation_time_records.find({"username": username})
            .sort("received_at", -1)
            .limit(limit)
        ]
        return {"username": username, "requests": requests, "timeRecords": timings}


def _public_user(doc: dict[str, Any]) -> dict[str, Any]:
    """A user document as JSON: string id, ISO dates."""
    doc["_id"] = str(doc.get("_id"))
    for key in ("created_at", "last_seen_at", "saved_at"):
        if isinstance(doc.get(key), datetime):
            doc[key] = doc[key].isoformat()
    return doc
