"""The refinement app's participant-facing use cases: login/save, /generate (run + persist), history.

Fixes over the original (research note §7): bounded, typed inputs with real 4xx statuses;
model failures are 502/503 and leave nothing behind (the run's images and sketches are
deleted, only a `failed` request line and the `generations` records remain); an empty
image is never a success; every stimulus is stored with who, which session, which
template versions and which model calls produced it.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any

from bson import ObjectId
from pydantic import ValidationError
from pymongo.errors import DocumentTooLarge, PyMongoError

from apps.core.context import Services
from apps.core.envelope import BusinessException
from apps.core.errors import ApiError
from apps.core.storage import decode_base64_image, inspect_image, to_data_url

from . import labels, pipeline, records, store, views
from .attribution import Caller, Who, attribute
from .records import Sketches
from .schemas import GenerateRequest, SaveData, StimuliQuery, nested_error, texts

log = logging.getLogger(__name__)


class StimulusService:
    """Participants, their /generate stimuli and their history (image versions: `VersionService`)."""

    def __init__(self, svc: Services) -> None:
        self.svc = svc
        self.db = svc.db

    # ------------------------------------------------------------------ login / save
    def paint_start(self, username: str | None, caller: Caller) -> dict[str, Any]:
        if not username:
            raise BusinessException(1, labels.MSG_USER_EMPTY)
        doc = store.ensure_user(self.db, username)
        session_id = "s_" + secrets.token_urlsafe(15)
        at = store.now()
        store.insert_session(
            self.db,
            {
                "_id": session_id,
                "username": username,
                "client": caller.client.key,
                "user_agent": caller.client.user_agent,
                "created_at": at,
                "last_seen_at": at,
                "saves": 0,
            },
        )
        return views.public_user(doc, store.FRESH_USER, session_id)

    def paint_save(self, username: str | None, data: dict[str, Any] | None) -> None:
        if not username or data is None:
            raise BusinessException(1, labels.MSG_USER_OR_DATA_EMPTY)
        try:
            parsed = SaveData.model_validate(data)
        except ValidationError as exc:
            raise nested_error(exc, "data") from exc
        update: dict[str, Any] = {"updated_at": store.now()}
        counts: dict[str, int] = {}
        for stage, field in labels.SCHEME_FIELDS.items():
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
            result = store.update_user(self.db, username, update)
        except DocumentTooLarge as exc:
            raise BusinessException(
                1, "saved state too large for one document (16 MB); fewer or smaller sketches", status=413
            ) from exc
        if result.matched_count == 0:
            raise BusinessException(1, labels.MSG_USER_MISSING, status=404)
        latest = store.latest_session_id(self.db, username)
        if latest:
            store.count_save(self.db, latest)
        store.insert_save(
            self.db,
            {
                "username": username,
                "session": latest,
                "created_at": store.now(),
                "currentStage": parsed.currentStage,
                "designTask": parsed.designTask,
                "schemes": counts,
            },
        )

    # ------------------------------------------------------------------ /generate
    def generate(self, body: GenerateRequest, caller: Caller) -> dict[str, Any]:
        """Attribute, store the sketches, run the type's pipeline, persist; a failure keeps only its log line."""
        who = attribute(
            self.db,
            caller,
            username=body.username or body.prompts.username,
            session_id=body.sessionId or body.prompts.sessionId,
        )
        request_id = str(ObjectId())
        language = body.prompts.language or self.svc.settings.REFINEMENT_LANGUAGE
        started_at, t0 = store.now(), time.perf_counter()
        run = pipeline.Run(
            self.svc, request_id=request_id, username=who.username, session=who.session, language=language
        )
        record: dict[str, Any] = {
            "_id": request_id,
            "username": who.username,
            "session": who.session,
            "attribution": who.attribution,
            "gen_type": body.type,
            "stage": labels.TYPE_STAGES[body.type],
            "language": language,
            "input": records.input_record(body, None),
            "created_at": started_at,
        }
        try:
            sketches = self._store_sketches(body, who, request_id)
            record["input"] = records.input_record(body, sketches)
            record["sketch_ids"] = [s[0] for s in sketches if s]
            data, stimuli = _dispatch(run, body, sketches)
        except BaseException as exc:
            run.close()
            self._discard(request_id)
            # the failure is logged (inputs without images, steps, error); nothing it made is kept
            record.update(
                status="failed",
                error=records.error_summary(exc),
                steps=run.steps,
                sketch_ids=[],
                input=records.input_record(body, None),
                finished_at=store.now(),
                duration_ms=round((time.perf_counter() - t0) * 1000, 1),
            )
            store.insert_request_quietly(self.db, record)
            store.count_failed_quietly(self.db, who.session)
            raise
        run.close()
        provenance = run.provenance()
        docs = [records.stimulus_doc(st, request_id, body, who, language, provenance) for st in stimuli]
        record.update(
            status="done",
            steps=run.steps,
            stimulus_ids=[d["_id"] for d in docs],
            image_ids=run.image_ids,
            finished_at=store.now(),
            duration_ms=round((time.perf_counter() - t0) * 1000, 1),
        )
        self._persist(docs, record, who.session)
        data["requestId"] = request_id
        # every type, type 2 (one naming stimulus) included, so a frontend links any reply to its records
        data["stimulusIds"] = [d["_id"] for d in docs]
        return data

    def _persist(self, docs: list[dict[str, Any]], record: dict[str, Any], session: str | None) -> None:
        """Write the stimuli, the request line and the session's last-seen time side by side (three round
        trips on the critical path of every /generate otherwise). A failed write undoes the run's records
        and images, so nothing is left but the model calls' `generations` records."""
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="refine-persist") as pool:
            stimuli = pool.submit(store.insert_stimuli, self.db, docs)
            request = pool.submit(store.insert_request, self.db, record)
            try:
                stimuli.result()
                request.result()
            except PyMongoError:
                wait([stimuli, request])
                store.delete_run(self.db, record["_id"])
                self._discard(record["_id"])
                raise
            if session:
                store.count_run(self.db, session, "done", len(docs))

    def _store_sketches(self, body: GenerateRequest, who: Who, request_id: str) -> Sketches:
        """Decode, check and store the sketches the request carries (kind "sketch", linked to the request)."""
        out: Sketches = []
        seen: dict[str, str] = {}
        for i, value in enumerate(_sketch_values(body)):
            if value is None:
                out.append(None)
                continue
            where = (
                "prompts.designImage" if body.type == labels.TYPE_DEEP else f"prompts.schemes.{i}.designImage"
            )
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
                    raw, app=labels.APP, user=who.username, kind="sketch", job=request_id, session=who.session
                )
            out.append((seen[digest], raw))
        return out

    def _discard(self, request_id: str) -> None:
        """Delete every image a failed request stored (generated images and its sketches)."""
        try:
            for image_id in store.job_image_ids(self.db, request_id):
                self.svc.images.delete(image_id)
        except PyMongoError as exc:
            log.error("could not clean up the images of failed request %s: %s", request_id, exc)

    # ------------------------------------------------------------------ history
    def sessions(self, username: str, limit: int, caller: Caller) -> dict[str, Any]:
        caller.check_owner(username, "not found")
        return {
            "username": username,
            "sessions": self._summaries(store.user_sessions(self.db, username, limit)),
        }

    def stimuli(self, username: str, query: StimuliQuery, caller: Caller) -> dict[str, Any]:
        caller.check_owner(username, "not found")
        flt: dict[str, Any] = {"username": username}
        if query.sessionId:
            flt["session"] = query.sessionId
        if query.type is not None:
            flt["gen_type"] = query.type
        if query.before:
            flt["_id"] = {"$lt": query.before}
        docs = store.stimuli_page(self.db, flt, query.limit)
        more = len(docs) > query.limit
        docs = docs[: query.limit]
        return {
            "stimuli": [views.public_stimulus(d, caller.base_url) for d in docs],
            "next": str(docs[-1]["_id"]) if more and docs else None,
        }

    def session(self, session_id: str, caller: Caller) -> dict[str, Any]:
        doc = store.find_session(self.db, session_id)
        if doc is None:
            raise BusinessException(1, labels.SESSION_NOT_FOUND, status=404)
        requests = store.session_requests(self.db, session_id)
        (summary,) = self._summaries([doc])
        caller.check_owner(summary.get("username"), labels.SESSION_NOT_FOUND)
        return {**summary, "requestList": [views.request_summary(r, caller.base_url) for r in requests]}

    def stimulus(self, stimulus_id: str, caller: Caller) -> dict[str, Any]:
        doc = store.find_stimulus(self.db, stimulus_id)
        return _visible(doc, views.public_stimulus, labels.STIMULUS_NOT_FOUND, caller)

    def request(self, request_id: str, caller: Caller) -> dict[str, Any]:
        doc = store.find_request(self.db, request_id)
        return _visible(doc, views.public_request, labels.REQUEST_NOT_FOUND, caller)

    def _summaries(self, sessions: list[dict[str, Any]]) -> list[dict[str, Any]]:
        request_counts, stimulus_counts = store.session_counts(self.db, sessions)
        return [views.session_summary(s, request_counts, stimulus_counts) for s in sessions]


def _visible(
    doc: dict[str, Any] | None,
    shape: Callable[[dict[str, Any], str | None], dict[str, Any]],
    not_found: str,
    caller: Caller,
) -> dict[str, Any]:
    """The shaped document; the same 404 when it is missing and when the caller may not see it."""
    if doc is None:
        raise BusinessException(1, not_found, status=404)
    data = shape(doc, caller.base_url)
    caller.check_owner(data.get("username"), not_found)
    return data


def _sketch_values(body: GenerateRequest) -> list[str | None]:
    if body.type == labels.TYPE_DEEP:
        return [(body.prompts.designImage or "").strip() or None]
    if body.type == labels.TYPE_CONVERGENCE_NAMES:
        return [(s.designImage or "").strip() or None for s in body.prompts.schemes or []]
    return []


def _dispatch(
    run: pipeline.Run, body: GenerateRequest, sketches: Sketches
) -> tuple[dict[str, Any], list[pipeline.Stimulus]]:
    """Run the type's pipeline; (the reply's data without our ids, the stimuli to store)."""
    prompts = body.prompts
    if body.type == labels.TYPE_RAPID:
        stimuli = pipeline.rapid(run, (prompts.task or "").strip(), prompts.num or 0)
        return {"count": len(stimuli), "result": [records.creative(s) for s in stimuli]}, stimuli
    if body.type == labels.TYPE_DEEP:
        sketch = sketches[0] if sketches else None
        stimuli, _ = pipeline.deep(
            run,
            (prompts.designTask or "").strip(),
            texts(prompts.designTexts),
            to_data_url(sketch[1]) if sketch else None,
        )
        return {
            "schemeId": prompts.schemeId,
            "count": len(stimuli),
            "result": [records.creative(s) for s in stimuli],
        }, stimuli
    if body.type == labels.TYPE_CONVERGENCE_NAMES:
        schemes = [{"texts": texts(s.designTexts)} for s in prompts.schemes or []]
        urls = [to_data_url(s[1]) if s else None for s in sketches]
        st = pipeline.convergence_names(
            run, (prompts.designTask or "").strip(), schemes, urls, prompts.selectNum
        )
        assert st.result is not None
        return {"names": st.result["names"], "selected": st.result["selected"]}, [st]
    stimuli = pipeline.convergence(
        run, [texts(s.designTexts) for s in prompts.selectedSchemes or []], prompts.num or 0
    )
    return {"result": [records.creative(s) for s in stimuli]}, stimuli
