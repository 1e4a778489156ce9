"""The refinement app's operations: login/save, /generate (validate, run, persist), history.

Fixes over the original (research note §7): bounded, typed inputs with real 4xx statuses;
model failures are 502/503 and leave nothing behind (the run's images and sketches are
deleted, only a `failed` request line and the `generations` records remain); an empty
image is never a success; every stimulus is stored with who, which session, which
template versions and which model calls produced it.

Who made a /generate call: the original frontend sends no user on /generate, so we use,
in order: the authenticated user (AUTH_MODE on); `username` / `sessionId` in the body or
in `prompts` (a patched frontend, other clients); else the latest /paint/start session
from the same client (address + user agent) within SESSION_INFER_HOURS, marked
`attribution: "inferred"`; else `anonymous`.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from bson import ObjectId
from pydantic import BaseModel, ValidationError
from pymongo import DESCENDING
from pymongo.errors import DocumentTooLarge, PyMongoError

from agent.types import ModelError
from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.errors import ApiError, pydantic_detail
from apps.core.storage import decode_base64_image, inspect_image, to_base64, to_data_url

from . import labels as L
from . import pipeline as P
from . import store as S
from .schemas import (
    MAX_CONVERGENCE_TOTAL,
    PROMPT_MODELS,
    ConvergenceNamesPrompts,
    ConvergencePrompts,
    DeepPrompts,
    GenerateBody,
    RapidPrompts,
    SaveData,
    StimuliQuery,
)

log = logging.getLogger(__name__)

SESSION_INFER_HOURS = 12


@dataclass(frozen=True)
class Client:
    """Where a request came from (hashed: only used to link /generate calls to a /paint/start)."""

    key: str | None
    user_agent: str | None = None

    @classmethod
    def from_parts(cls, address: str | None, user_agent: str | None) -> Client:
        if not address:
            return cls(None, user_agent)
        digest = hashlib.sha256(f"{address}|{user_agent or ''}".encode()).hexdigest()[:20]
        return cls(digest, (user_agent or "")[:300] or None)


@dataclass(frozen=True)
class Who:
    username: str | None
    session: str | None
    attribution: str  # auth | explicit | inferred | anonymous


def parse_model(model: type[BaseModel], value: Any, prefix: str) -> Any:
    """Validate a nested payload; a failure is a 422 envelope naming the fields (`prompts.num: ...`)."""
    try:
        return model.model_validate(value)
    except ValidationError as exc:
        parts = []
        for d in pydantic_detail(exc, "body")[:5]:
            where = ".".join([prefix, *(str(p) for p in d["loc"][1:])])
            parts.append(f"{where}: {d['msg']}")
        raise BusinessException(1, "invalid request: " + "; ".join(parts), status=422) from exc


class RefinementService:
    def __init__(self, svc: Services, base_url: str | None = None) -> None:
        self.svc = svc
        self.db = svc.db
        self.base_url = base_url

    # ------------------------------------------------------------------ login / save
    def paint_start(self, username: str, client: Client) -> dict[str, Any]:
        doc = S.ensure_user(self.db, username)
        session_id = "s_" + secrets.token_urlsafe(15)
        at = S.now()
        self.db.refinement_sessions.insert_one(
            {
                "_id": session_id,
                "username": username,
                "client": client.key,
                "user_agent": client.user_agent,
                "created_at": at,
                "last_seen_at": at,
                "saves": 0,
            }
        )
        return S.public_user(doc, session_id)

    def paint_save(self, username: str, data: dict[str, Any]) -> None:
        parsed: SaveData = parse_model(SaveData, data, "data")
        update: dict[str, Any] = {"updated_at": S.now()}
        counts: dict[str, int] = {}
        for stage, field in L.SCHEME_FIELDS.items():
            schemes = (parsed.designSchemes or {}).get(stage)
            if (
                schemes is not None
            ):  # an absent or null stage keeps what was saved (the original raised KeyError)
                update[field] = schemes
                counts[field] = len(schemes)
        if parsed.designTask is not None:
            update["designTask"] = parsed.designTask
        if parsed.currentStage is not None:
            update["currentStage"] = parsed.currentStage
        try:
            result = self.db.refinement_users.update_one({"username": username}, {"$set": update})
        except DocumentTooLarge as exc:
            raise BusinessException(
                1, "saved state too large for one document (16 MB); fewer or smaller sketches", status=413
            ) from exc
        if result.matched_count == 0:
            raise BusinessException(1, L.MSG_USER_MISSING, status=404)
        latest = self._latest_session_ids(username)
        if latest:
            self.db.refinement_sessions.update_one(
                {"_id": latest[0]}, {"$inc": {"saves": 1}, "$set": {"last_seen_at": S.now()}}
            )
        self.db.refinement_saves.insert_one(
            {
                "username": username,
                "session": latest[0] if latest else None,
                "created_at": S.now(),
                "currentStage": parsed.currentStage,
                "designTask": parsed.designTask,
                "schemes": counts,
            }
        )

    def _latest_session_ids(self, username: str) -> list[str]:
        doc = self.db.refinement_sessions.find_one(
            {"username": username}, {"_id": 1}, sort=[("created_at", DESCENDING)]
        )
        return [doc["_id"]] if doc else []

    # ------------------------------------------------------------------ attribution
    def attribute(
        self, *, auth_user: str | None, username: str | None, session_id: str | None, client: Client
    ) -> Who:
        kind = "auth" if auth_user else "explicit"
        name = auth_user or username or None
        if session_id:
            doc = self.db.refinement_sessions.find_one({"_id": session_id}, {"username": 1})
            if doc is None or (name and doc["username"] != name):
                raise BusinessException(1, f"unknown sessionId {session_id}", status=404)
            return Who(doc["username"], session_id, kind)
        if name:
            ids = self._latest_session_ids(name)
            return Who(name, ids[0] if ids else None, kind)
        if client.key:
            since = S.now() - timedelta(hours=SESSION_INFER_HOURS)
            doc = self.db.refinement_sessions.find_one(
                {"client": client.key, "created_at": {"$gte": since}},
                {"username": 1},
                sort=[("created_at", DESCENDING)],
            )
            if doc is not None:
                return Who(doc["username"], doc["_id"], "inferred")
        return Who(None, None, "anonymous")

    # ------------------------------------------------------------------ /generate
    def check(self, body: GenerateBody) -> Any:
        """The original's checks, in its order and with its messages; then types and ranges."""
        if body.appid != L.APP_PAINT:
            raise BusinessException(1, L.MSG_APP_MISSING)
        if body.type not in PROMPT_MODELS:
            raise BusinessException(1, L.MSG_INVALID_TYPE)
        prompts = parse_model(PROMPT_MODELS[body.type], body.prompts, "prompts")
        if isinstance(prompts, RapidPrompts):
            if not (prompts.task or "").strip():
                raise BusinessException(1, L.MSG_TASK_MISSING)
            if not prompts.num:
                raise BusinessException(1, L.MSG_NUM_MISSING)
        elif isinstance(prompts, DeepPrompts):
            image = (prompts.designImage or "").strip()
            if prompts.designTask is None and image:  # HEAD form without its task (seed 003 sends neither)
                raise BusinessException(1, L.MSG_TASK_MISSING)
            if not _texts(prompts.designTexts):
                raise BusinessException(1, L.MSG_TEXTS_MISSING)
            if prompts.schemeId is None:
                raise BusinessException(1, L.MSG_SCHEME_ID_MISSING)
        elif isinstance(prompts, ConvergenceNamesPrompts):
            if prompts.designTask is not None and not prompts.designTask.strip():
                raise BusinessException(1, L.MSG_DESCRIPTION_MISSING)
            if not prompts.schemes:
                raise BusinessException(1, L.MSG_SCHEMES_MISSING)
        elif isinstance(prompts, ConvergencePrompts):
            if not prompts.selectedSchemes:
                raise BusinessException(1, L.MSG_SCHEMES_MISSING)
            if not prompts.num:
                raise BusinessException(1, L.MSG_NUM_MISSING)
            if len(prompts.selectedSchemes) * prompts.num > MAX_CONVERGENCE_TOTAL:
                raise BusinessException(
                    1,
                    f"invalid request: prompts.selectedSchemes x prompts.num must be at most {MAX_CONVERGENCE_TOTAL}"
                    f" (got {len(prompts.selectedSchemes)} x {prompts.num})",
                    status=422,
                )
        return prompts

    def generate(self, body: GenerateBody, prompts: Any, who: Who) -> dict[str, Any]:
        request_id = str(ObjectId())
        language = prompts.language or self.svc.settings.REFINEMENT_LANGUAGE
        started_at, t0 = S.now(), time.perf_counter()
        run = P.Run(
            self.svc,
            request_id=request_id,
            username=who.username,
            session=who.session,
            language=language,
            settings_dir=self.svc.settings.PROMPTS_DIR,
        )
        record: dict[str, Any] = {
            "_id": request_id,
            "username": who.username,
            "session": who.session,
            "attribution": who.attribution,
            "gen_type": body.type,
            "stage": L.TYPE_STAGES[body.type],
            "language": language,
            "input": _input_record(body.type, prompts, None),
            "created_at": started_at,
        }
        try:
            sketches = self._store_sketches(body.type, prompts, who, request_id)
            record["input"] = _input_record(body.type, prompts, sketches)
            record["sketch_ids"] = [s[0] for s in sketches if s]
            data, stimuli = self._dispatch(run, body.type, prompts, sketches)
        except BaseException as exc:
            run.close()
            self._discard(request_id)
            # the failure is logged (inputs without images, steps, error); nothing it made is kept
            record.update(
                status="failed",
                error=_error_summary(exc),
                steps=run.steps,
                sketch_ids=[],
                input=_input_record(body.type, prompts, None),
                finished_at=S.now(),
                duration_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            self._insert_quietly("refinement_requests", record)
            raise
        run.close()
        provenance = run.provenance()
        docs = [
            self._stimulus_doc(
                st,
                request_id,
                body.type,
                who,
                language,
                provenance,
                scheme_id=getattr(prompts, "schemeId", None),
            )
            for st in stimuli
        ]
        record.update(
            status="done",
            steps=run.steps,
            stimulus_ids=[d["_id"] for d in docs],
            image_ids=run.image_ids,
            finished_at=S.now(),
            duration_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        try:
            if docs:
                self.db.refinement_stimuli.insert_many(docs, ordered=True)
            self.db.refinement_requests.insert_one(record)
        except PyMongoError:
            self.db.refinement_stimuli.delete_many({"request_id": request_id})
            self._discard(request_id)
            raise
        if who.session:
            self.db.refinement_sessions.update_one({"_id": who.session}, {"$set": {"last_seen_at": S.now()}})
        data["requestId"] = request_id
        # every type, type 2 (one naming stimulus) included, so a frontend links any reply to its records
        data["stimulusIds"] = [d["_id"] for d in docs]
        return data

    def _dispatch(
        self, run: P.Run, type_: int, prompts: Any, sketches: list[tuple[str, bytes] | None]
    ) -> tuple[dict[str, Any], list[P.Stimulus]]:
        if type_ == L.TYPE_RAPID:
            stimuli = P.rapid(run, prompts.task.strip(), prompts.num)
            return {"count": len(stimuli), "result": [_creative(s) for s in stimuli]}, stimuli
        if type_ == L.TYPE_DEEP:
            sketch = sketches[0] if sketches else None
            stimuli, _ = P.deep(
                run,
                (prompts.designTask or "").strip(),
                _texts(prompts.designTexts),
                to_data_url(sketch[1]) if sketch else None,
            )
            return {
                "schemeId": prompts.schemeId,
                "count": len(stimuli),
                "result": [_creative(s) for s in stimuli],
            }, stimuli
        if type_ == L.TYPE_CONVERGENCE_NAMES:
            schemes = [{"texts": _texts(s.designTexts)} for s in prompts.schemes]
            urls = [to_data_url(s[1]) if s else None for s in sketches]
            st = P.convergence_names(
                run, (prompts.designTask or "").strip(), schemes, urls, prompts.selectNum
            )
            assert st.result is not None
            return {"names": st.result["names"], "selected": st.result["selected"]}, [st]
        stimuli = P.convergence(run, [_texts(s.designTexts) for s in prompts.selectedSchemes], prompts.num)
        return {"result": [_creative(s) for s in stimuli]}, stimuli

    # -- inputs
    def _sketch_values(self, type_: int, prompts: Any) -> list[str | None]:
        if type_ == L.TYPE_DEEP:
            return [(prompts.designImage or "").strip() or None]
        if type_ == L.TYPE_CONVERGENCE_NAMES:
            return [(s.designImage or "").strip() or None for s in prompts.schemes]
        return []

    def _store_sketches(
        self, type_: int, prompts: Any, who: Who, request_id: str
    ) -> list[tuple[str, bytes] | None]:
        """Decode, check and store the sketches the request carries (kind "sketch", linked to the request)."""
        out: list[tuple[str, bytes] | None] = []
        seen: dict[str, str] = {}
        values = self._sketch_values(type_, prompts)
        for i, value in enumerate(values):
            if value is None:
                out.append(None)
                continue
            where = "prompts.designImage" if type_ == L.TYPE_DEEP else f"prompts.schemes.{i}.designImage"
            try:
                raw = decode_base64_image(value, field=where)
                inspect_image(
                    raw, max_bytes=self.svc.images.max_bytes, max_side=self.svc.images.max_side, field=where
                )
            except ApiError as exc:
                raise BusinessException(1, f"invalid request: {exc.message}", status=exc.status) from exc
            digest = hashlib.sha256(raw).hexdigest()
            if digest not in seen:
                seen[digest] = self.svc.images.save(
                    raw, app=L.APP, user=who.username, kind="sketch", job=request_id, session=who.session
                )
            out.append((seen[digest], raw))
        return out

    # -- outputs
    def _stimulus_doc(
        self,
        st: P.Stimulus,
        request_id: str,
        type_: int,
        who: Who,
        language: str,
        provenance: dict[str, Any],
        scheme_id: int | None,
    ) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "_id": str(ObjectId()),
            "request_id": request_id,
            "username": who.username,
            "session": who.session,
            "attribution": who.attribution,
            "gen_type": type_,
            "stage": L.TYPE_STAGES[type_],
            "index": st.index,
            "creative_type": st.creative_type,
            "display_type": st.display_type,
            "items": st.items,
            "images": [
                {
                    "id": g.id,
                    "role": g.role,
                    "prompt": g.prompt,
                    "positive": g.positive,
                    "negative": g.negative,
                    "width": g.width,
                    "height": g.height,
                    "generation_id": g.generation_id,
                    "instance": g.instance,
                    "templates": g.templates,
                }
                for g in st.images
            ],
            "texts": st.texts,
            "result": st.result,
            "provenance": provenance,
            "language": language,
            "created_at": S.now(),
            **st.extra,
        }
        if type_ == L.TYPE_DEEP:
            doc["scheme_id"] = scheme_id
        return doc

    def _discard(self, request_id: str) -> None:
        """Delete every image a failed request stored (generated images and its sketches)."""
        try:
            for doc in self.db["images.files"].find(
                {"metadata.job": request_id, "metadata.app": L.APP}, {"_id": 1}
            ):
                self.svc.images.delete(doc["_id"])
        except PyMongoError as exc:
            log.error("could not clean up the images of failed request %s: %s", request_id, exc)

    def _insert_quietly(self, collection: str, doc: dict[str, Any]) -> None:
        try:
            self.db[collection].insert_one(doc)
        except PyMongoError as exc:
            log.error("could not record failed request %s: %s", doc.get("_id"), exc)

    # ------------------------------------------------------------------ history
    def sessions(self, username: str, limit: int) -> dict[str, Any]:
        docs = list(
            self.db.refinement_sessions.find({"username": username})
            .sort("created_at", DESCENDING)
            .limit(limit)
        )
        return {"username": username, "sessions": S.session_summaries(self.db, docs)}

    def stimuli(self, username: str, query: StimuliQuery) -> dict[str, Any]:
        flt: dict[str, Any] = {"username": username}
        if query.sessionId:
            flt["session"] = query.sessionId
        if query.type is not None:
            flt["gen_type"] = query.type
        if query.before:
            flt["_id"] = {"$lt": query.before}
        docs = list(self.db.refinement_stimuli.find(flt).sort("_id", DESCENDING).limit(query.limit + 1))
        more = len(docs) > query.limit
        docs = docs[: query.limit]
        return {
            "stimuli": [S.public_stimulus(d, self.base_url) for d in docs],
            "next": str(docs[-1]["_id"]) if more and docs else None,
        }

    def session(self, session_id: str) -> dict[str, Any]:
        doc = self.db.refinement_sessions.find_one({"_id": session_id})
        if doc is None:
            raise BusinessException(1, S.SESSION_NOT_FOUND, status=404)
        requests = list(
            self.db.refinement_requests.find({"session": session_id})
            .sort("created_at", DESCENDING)
            .limit(500)
        )
        (summary,) = S.session_summaries(self.db, [doc])
        return {
            **summary,
            "requestList": [
                {
                    k: v
                    for k, v in S.public_request(r, self.base_url).items()
                    if k
                    in (
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
                }
                for r in requests
            ],
        }

    def stimulus(self, stimulus_id: str) -> dict[str, Any]:
        doc = self.db.refinement_stimuli.find_one({"_id": stimulus_id})
        if doc is None:
            raise BusinessException(1, S.STIMULUS_NOT_FOUND, status=404)
        return S.public_stimulus(doc, self.base_url)

    def request(self, request_id: str) -> dict[str, Any]:
        doc = self.db.refinement_requests.find_one({"_id": request_id})
        if doc is None:
            raise BusinessException(1, S.REQUEST_NOT_FOUND, status=404)
        return S.public_request(doc, self.base_url)


def _input_record(
    type_: int, prompts: Any, sketches: list[tuple[str, bytes] | None] | None
) -> dict[str, Any]:
    """The request as stored: sketches replaced by their image ids (None: not stored)."""
    data = prompts.model_dump(exclude_none=True)
    if type_ == L.TYPE_DEEP and data.pop("designImage", None) is not None:
        data["designImageId"] = sketches[0][0] if sketches and sketches[0] else None
    for i, scheme in enumerate(data.get("schemes") or []):
        if scheme.pop("designImage", None) is not None:
            sketch = sketches[i] if sketches and i < len(sketches) else None
            scheme["designImageId"] = sketch[0] if sketch else None
    return data


def _texts(values: list[str] | None) -> list[str]:
    return [t.strip() for t in values or [] if t and t.strip()]


def _public_item(stored: dict[str, Any], pngs: dict[str, bytes]) -> dict[str, Any]:
    combos = stored.get("combinations")
    image_id = stored.get("image_id")
    return {
        "type": stored["type"],
        "text": stored.get("text"),
        "image": to_base64(pngs[image_id]) if image_id else None,
        "combinations": [_public_item(c, pngs) for c in combos] if combos is not None else None,
    }


def _creative(st: P.Stimulus) -> dict[str, Any]:
    """The original's Creative: {type, displayType, items}; images as raw base64 (no data: prefix)."""
    pngs = {g.id: g.png for g in st.images}
    return {
        "type": st.creative_type,
        "displayType": st.display_type,
        "items": [_public_item(i, pngs) for i in st.items],
    }


def _error_summary(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ModelError):
        return {"type": "model", **exc.to_dict()}
    if isinstance(exc, BusinessException):
        return {"type": "business", "message": exc.message, "status": exc.status}
    if isinstance(exc, ApiError):
        return {"type": "api", "message": exc.message, "status": exc.status}
    return {"type": type(exc).__name__, "message": str(exc)[:500]}
