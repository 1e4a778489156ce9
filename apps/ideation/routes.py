"""HTTP routes of the ideation app (StepIdeator): thin — validate, call the service, shape the reply."""

from __future__ import annotations

import re

from flask import Response, jsonify, make_response, request
from flask_openapi3 import APIBlueprint, Tag

from apps.core.auth import authenticate, check_owner, current_user_name
from apps.core.context import services
from apps.core.envelope import BusinessException, envelope
from apps.core.errors import ApiError
from apps.core.openapi import PROTECTED
from apps.core.storage import answer_base_url

from . import labels
from .attribution import client_key
from .responses import IdeationEnvelope, TimeRecordOut, UploadError, UploadImageOut, UploadOut
from .schemas import (
    USERNAME_PATTERN,
    GenerateBody,
    HistoryQuery,
    SaveBody,
    TimeRecordBody,
    UsernameBody,
    UserPath,
)
from .service import IdeationService

bp = APIBlueprint(
    "ideation",
    __name__,
    abp_tags=[Tag(name="ideation", description="StepIdeator")],
    abp_security=PROTECTED,
)
_ENVELOPE = {200: IdeationEnvelope}
_UPLOAD_ERRORS = {400: UploadError, 422: UploadError}
# multipart bodies are read from request.files (the original's error answers), so they are documented here
_UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "PNG, JPEG, WebP or GIF",
                        },
                        "username": {
                            "type": "string",
                            "pattern": USERNAME_PATTERN,
                            "description": "auth off: the participant (also `?username=`); see docs/ideation.md",
                            "example": "10",
                        },
                    },
                },
                "encoding": {"file": {"contentType": "image/png, image/jpeg, image/webp, image/gif"}},
            }
        },
    }
}


def _service() -> IdeationService:
    return IdeationService(services(), answer_base_url())


@bp.route("/ping", methods=["GET", "POST"])
def ping() -> Response:
    """Liveness: plain text `pong`."""
    resp = make_response("pong")
    resp.mimetype = "text/plain"
    return resp


@bp.post("/generate", responses=_ENVELOPE)
def generate(body: GenerateBody) -> Response:
    """Every AI button: dispatch on `selectedButtonInfo.aiStage` × `buttonText` (Chinese labels or English ids)."""
    username = current_user_name(body.username) or ""
    return envelope(_service().generate(body, username, client=_client()))


def _client() -> str:
    """This browser's key, which links StepIdeator's nameless uploads to its participant (attribution.py)."""
    return client_key(request.remote_addr, request.headers.get("User-Agent"))


def _uploaded_file(missing_message: str) -> tuple[bytes, str] | Response:
    file = request.files.get("file")
    if file is None:
        return _upload_error(400, missing_message)
    if not file.filename:
        return _upload_error(400, "No selected file")
    data = file.read()
    if not data:
        return _upload_error(400, "No file provided")
    return data, file.filename


def _upload_error(status: int, message: str) -> Response:
    # the original answered {"error": ...}; `success`/`message` added for envelope-style clients
    resp = jsonify({"success": False, "error": message, "message": message})
    resp.status_code = status
    return resp


def _store_upload(missing: str, kind: str) -> str | Response:
    """The uploaded `file` stored as its own image: its URL, or the original's error answer."""
    got = _uploaded_file(missing)
    if isinstance(got, Response):
        return got
    data, name = got
    stated = request.form.get("username") or request.args.get("username") or None
    if stated is not None and not re.fullmatch(USERNAME_PATTERN, stated):
        return _upload_error(422, "username: letters, digits, '.', '-', '_' (at most 64)")
    username = current_user_name(stated)
    source = "auth" if authenticate() is not None else ("form" if username else None)
    try:
        return _service().upload(data, name, username, kind, source=source, client=_client())
    except ApiError as exc:
        return _upload_error(exc.status, exc.message)


@bp.post("/upload", responses={200: UploadOut, **_UPLOAD_ERRORS}, openapi_extensions=_UPLOAD_BODY)
def upload() -> Response:
    """Upload the selected canvas (multipart `file`); returns `{url}` ending in `.png`. Each upload is its own image."""
    url = _store_upload("No file provided", "canvas")
    return url if isinstance(url, Response) else jsonify({"url": url})


@bp.post("/uploadImage", responses={200: UploadImageOut, **_UPLOAD_ERRORS}, openapi_extensions=_UPLOAD_BODY)
def upload_image() -> Response:
    """Upload a user's own image (multipart `file`); returns `{success: true, url}`."""
    url = _store_upload("No file part", "upload")
    return url if isinstance(url, Response) else jsonify({"success": True, "url": url})


@bp.post("/timeRecord", responses={200: TimeRecordOut})
def time_record(body: TimeRecordBody) -> Response:
    """Store a participant's stage timing records (appended, never overwritten)."""
    body.username = current_user_name(body.username) or ""
    _service().time_record(body, client=_client())
    return jsonify({"success": True, "message": "Timing records saved successfully"})


@bp.post("/paint/start", responses=_ENVELOPE)
def paint_start(body: UsernameBody) -> Response:
    """Find or create the participant's saved workspace and return it."""
    username = current_user_name(body.username)
    if not username:
        raise BusinessException(1, labels.MSG_USER_EMPTY)
    return envelope(_service().paint_start(username))


@bp.post("/paint/save", responses=_ENVELOPE)
def paint_save(body: SaveBody) -> Response:
    """Save the participant's workspace (`data.designSchemes` keyed by stage label, designTask, currentStage)."""
    username = current_user_name(body.username)
    if not username or body.data is None:
        raise BusinessException(1, "用户名字或数据为空")
    _service().paint_save(username, body.data)
    return envelope(None)


@bp.get("/users/<username>", responses=_ENVELOPE)
def user_state(path: UserPath) -> Response:
    """A participant's saved workspace."""
    check_owner(path.username)
    doc = _service().user_state(path.username)
    if doc is None:
        raise BusinessException(1, "用户不存在", status=404)
    return envelope(doc)


@bp.get("/users/<username>/history", responses=_ENVELOPE)
def user_history(path: UserPath, query: HistoryQuery) -> Response:
    """Everything a participant generated and saw (requests with inputs, outputs, image URLs) and their timings."""
    check_owner(path.username)
    return envelope(_service().history(path.username, query.limit))
