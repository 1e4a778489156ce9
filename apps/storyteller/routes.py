"""HTTP + WebSocket routes of the storyteller app (StorAIteller): thin — validate, call the service, shape.

Original contract (FastAPI, under our prefix): `POST /setstory/`, `POST /redopartstory/` -> `["<prompt>"]`,
`POST /savestory/`, WebSocket `/ws` (raw text frames). Every call belongs to a session: the
`session` field / `?session=` / the `storyteller_session` cookie set here, else this client's
latest session. Our own page and JSON clients use `api/...`, `stream` (SSE) and `/ws?format=json`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

from flask import Blueprint, Flask, Response, jsonify, make_response, render_template, request
from flask_openapi3 import APIBlueprint, Tag
from flask_sock import Sock
from pydantic import BaseModel, Field
from simple_websocket import ConnectionClosed
from wsproto.frame_protocol import CloseReason

from agent.types import ModelError
from apps.core.auth import authenticate, make_scoped_token, register_token_scope, token_secret
from apps.core.context import services
from apps.core.errors import ApiError
from apps.core.openapi import PROTECTED, document_model, raw, sse
from apps.core.sse import format_sse, sse_response

from . import service
from .responses import (
    CancelMessage,
    CancelOut,
    PromptList,
    RewriteOut,
    SavedOut,
    SettingsOut,
    StorySessionOut,
    StoryStreamEvent,
    StoryVersionOut,
    VersionsOut,
)
from .schemas import (
    GENRE_OPTIONS,
    REGISTER_OPTIONS,
    EditBody,
    FeedbackBody,
    RewriteBody,
    SaveStoryBody,
    SessionField,
    SessionQuery,
    StoryParts,
    StorySettings,
    StreamQuery,
    VersionPath,
)
from .store import StoryStore
from .stream import plan_stream, run_stream

log = logging.getLogger(__name__)

COOKIE = "storyteller_session"
HEADER = "X-Storyteller-Session"

bp = APIBlueprint(
    "storyteller",
    __name__,
    abp_tags=[Tag(name="storyteller", description="StorAIteller")],
    template_folder="templates",
    static_folder="static",
    static_url_path="/assets",
)


# --------------------------------------------------------------------------- helpers


def _caller() -> service.Caller:
    user = authenticate()
    return service.Caller(
        user=user.name if user else None, client=request.remote_addr, admin=bool(user and user.is_admin)
    )


def _store() -> StoryStore:
    return StoryStore(services().db)


def _session(
    explicit: str | None, *, fallback: bool = True, create_named: bool = False
) -> tuple[dict[str, Any], service.Caller, StoryStore]:
    caller = _caller()
    store = _store()
    explicit = explicit or request.args.get("session") or None
    session = service.resolve_session(
        store,
        caller,
        explicit=explicit,
        cookie=request.cookies.get(COOKIE),
        fallback=fallback,
        create_named=create_named,
    )
    assert session is not None
    return session, caller, store


def _with_session(resp: Response, session_id: str) -> Response:
    resp.headers[HEADER] = session_id
    if request.cookies.get(COOKIE) != session_id:
        resp.set_cookie(COOKIE, session_id, max_age=30 * 24 * 3600, httponly=True, samesite="Lax", path="/")
    return resp


def _json(body: Any, session_id: str, status: int = 200) -> Response:
    resp = jsonify(body)
    resp.status_code = status
    return _with_session(resp, session_id)


# --------------------------------------------------------------------------- the page


@bp.get("/", responses={200: raw("text/html", "the StorAIteller page")})
def page() -> Response:
    """The StorAIteller web page (settings, streamed story, rewrite, feedback, history)."""
    resp = make_response(
        render_template(
            "storyteller/index.html",
            genres=GENRE_OPTIONS,
            registers=REGISTER_OPTIONS,
            max_words=services().settings.STORYTELLER_MAX_WORDS,
        )
    )
    resp.headers["Cache-Control"] = "no-store"
    return resp


# --------------------------------------------------------------------------- the original contract


@bp.post("/setstory/", responses={200: PromptList}, security=PROTECTED)
def setstory(body: StorySettings) -> Response:
    """Submit the settings: builds this session's story prompt; answers `["<prompt>"]` (the original shape)."""
    session, caller, store = _session(body.session, fallback=False, create_named=True)
    story = service.set_story(services(), store, session, body, caller)
    return _json([story["prompt"]], session["_id"])


@bp.post("/redopartstory/", responses={200: PromptList}, security=PROTECTED)
def redopartstory(body: StoryParts) -> Response:
    """Mark a part for rewriting; the next `/ws` streams before + new part + after. Answers `["<prompt>"]`."""
    session, _, store = _session(body.session)
    pending = service.prepare_rewrite(
        services(),
        store,
        session,
        before=body.textbefore,
        selected=body.textselected,
        after=body.textafter,
        version_id=body.version,
        strict=False,
    )
    return _json([pending["prompt"]], session["_id"])


@bp.post("/savestory/", responses={200: SavedOut}, security=PROTECTED)
def savestory(body: SaveStoryBody) -> Response:
    """ "Good story": marks the story shown (and the prompt that produced it) for fine-tuning."""
    session, _, store = _session(body.session, create_named=True)
    form = body.model_dump(exclude={"session", "story", "version"})
    saved, version = service.save_feedback(
        services(), store, session, version_id=body.version, story=body.story, form=form, source="savestory"
    )
    return _json(
        {"saved": True, "id": saved["_id"], "version": version["_id"], "n": version["n"]}, session["_id"]
    )


# --------------------------------------------------------------------------- JSON API (our page)


@bp.post("/api/settings", responses={200: SettingsOut}, security=PROTECTED)
def api_settings(body: StorySettings) -> Response:
    """Submit the settings form; returns the session and its prompt as an object."""
    session, caller, store = _session(body.session, fallback=False, create_named=True)
    story = service.set_story(services(), store, session, body, caller)
    return _json(
        {
            "session": session["_id"],
            "prompt": story["prompt"],
            "template": story["template"],
            "template_hash": story["template_hash"],
            "settings": body.stored(),
        },
        session["_id"],
    )


@bp.post("/api/rewrite", responses={200: RewriteOut}, security=PROTECTED)
def api_rewrite(body: RewriteBody) -> Response:
    """Select a part of a version (three texts that rebuild it exactly, or start/end); stream next."""
    session, _, store = _session(body.session, fallback=False)
    pending = service.prepare_rewrite(
        services(),
        store,
        session,
        before=body.textbefore,
        selected=body.textselected,
        after=body.textafter,
        start=body.start,
        end=body.end,
        version_id=body.version,
    )
    return _json(
        {
            "session": session["_id"],
            "prompt": pending["prompt"],
            "version": pending["version"],
            "selected": pending["selected"],
            "words": pending["words"],
        },
        session["_id"],
    )


@bp.post("/api/edit", responses={201: StoryVersionOut}, security=PROTECTED)
def api_edit(body: EditBody) -> Response:
    """Save a manual edit of the story as a new version."""
    session, _, store = _session(body.session, fallback=False)
    version = service.save_edit(services(), store, session, body.text, body.parent)
    return _json(service.public_version(version), session["_id"], 201)


@bp.post("/api/feedback", responses={200: SavedOut}, security=PROTECTED)
def api_feedback(body: FeedbackBody) -> Response:
    """ "Good story" for one version (default: the current one)."""
    session, _, store = _session(body.session, fallback=False)
    saved, version = service.save_feedback(
        services(), store, session, version_id=body.version, good=body.good, comment=body.comment
    )
    return _json(
        {
            "saved": True,
            "id": saved["_id"],
            "version": version["_id"],
            "n": version["n"],
            "good": saved["good"],
        },
        session["_id"],
    )


@bp.post("/api/cancel", responses={200: CancelOut}, security=PROTECTED)
def api_cancel(body: SessionField) -> Response:
    """Stop this session's running generation (any worker); for SSE clients, which cannot send messages."""
    session, _, store = _session(body.session, fallback=False)
    service.request_cancel(store, session)
    return _json({"cancelled": True, "session": session["_id"]}, session["_id"])


@bp.get("/api/session", responses={200: StorySessionOut}, security=PROTECTED)
def api_session(query: SessionQuery) -> Response:
    """This session's settings, prompt, pending rewrite and current version."""
    session, _, _ = _session(query.session)
    return _json(service.public_session(session), session["_id"])


@bp.get("/api/versions", responses={200: VersionsOut}, security=PROTECTED)
def api_versions(query: SessionQuery) -> Response:
    """Version history of the session, oldest first (texts included)."""
    session, _, store = _session(query.session)
    versions = [service.public_version(v) for v in store.history(session["_id"])]
    return _json(
        {"session": session["_id"], "current_version": session.get("current_version"), "versions": versions},
        session["_id"],
    )


@bp.get("/api/versions/<version_id>", responses={200: StoryVersionOut}, security=PROTECTED)
def api_version(path: VersionPath) -> Response:
    """One version with its text, prompt and provenance."""
    caller = _caller()
    store = _store()
    version = store.version(path.version_id)
    if version is None or (
        caller.user is not None and version.get("user") != caller.user and not caller.admin
    ):
        raise ApiError(404, "unknown version")
    return jsonify(service.public_version(version))


# --------------------------------------------------------------------------- stream tokens (auth on, browsers)

TOKEN_KIND = "storyteller-session"
_STREAM_ENDPOINTS = {"storyteller.stream", "storyteller_root.stream"}
_WS_BLUEPRINTS = {"storyteller_ws", "storyteller_ws_root"}


class StreamTokenOut(BaseModel):
    token: str = Field(description="pass as `?token=` on this session's `stream` and `ws` URLs only")
    session: str
    expires_at: str
    expires_in: int = Field(description="seconds; checked when a stream opens (an open stream outlives it)")
    stream_url: str = Field(description="SSE URL, relative to the app's mount")
    ws_url: str = Field(description="WebSocket URL (JSON messages), relative to the app's mount")


def _is_session_stream(session_id: str) -> bool:
    """A scoped token opens this session's SSE and WebSocket streams, and nothing else."""
    endpoint = request.endpoint or ""
    is_stream = endpoint in _STREAM_ENDPOINTS or endpoint.split(".", 1)[0] in _WS_BLUEPRINTS
    return is_stream and request.args.get("session") == session_id


@bp.post("/api/stream-token", responses={200: StreamTokenOut}, security=PROTECTED)
def api_stream_token(body: SessionField) -> Response:
    """A short-lived `?token=` for this session's streams: EventSource and WebSocket cannot send headers.

    Sign in with the API key header first; the token opens `stream?session=S` and `ws?session=S` of this
    one session and is refused everywhere else."""
    caller, store = _caller(), _store()
    session = service.resolve_session(
        store, caller, explicit=body.session, cookie=None, fallback=False, create=False
    )
    if session is None:
        raise ApiError(404, "unknown session")
    svc = services()
    ttl = svc.settings.STREAM_TOKEN_TTL_S
    user = authenticate()
    token, expires = make_scoped_token(
        token_secret(svc.db, svc.settings.SECRET_KEY), user, TOKEN_KIND, session["_id"], ttl
    )
    query = f"session={session['_id']}&token={token}"
    return _json(
        {
            "token": token,
            "session": session["_id"],
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "expires_in": ttl,
            "stream_url": f"stream?{query}",
            "ws_url": f"ws?{query}&format=json",
        },
        session["_id"],
    )


# --------------------------------------------------------------------------- streaming (SSE and WebSocket)


def _error_message(exc: BaseException) -> str:
    if isinstance(exc, ModelError):
        return f"the language model failed: {exc.message}"
    if isinstance(exc, ApiError):
        return exc.message
    return "internal error while writing the story (logged)"


@bp.get(
    "/stream",
    responses={
        200: sse(StoryStreamEvent, "story deltas, then done, cancelled or error (see StoryStreamEvent)")
    },
    security=[*PROTECTED, {"streamToken": []}],
)
def stream(query: StreamQuery) -> Response:
    """The `/ws` stream over Server-Sent Events: `delta`, then `done` | `cancelled` | `error` events (JSON data).

    Close the EventSource after `done`/`error` (it would reconnect and write again). With auth on, pass
    `?token=` from `POST api/stream-token`.

    The same story also streams over the WebSocket `/storyteller/ws` (not an OpenAPI operation), query
    `session`, `action` (`next` | `story`), `format` (`text` | `json`), `token`: with `format=json` every
    frame is a StoryStreamEvent (first `start`); by default (the original) raw text frames carrying only
    the deltas, closed with 1000 when the story is complete and 1011 + a reason on error. Send
    CancelMessage `{"type": "cancel"}` (or the text `cancel`) to stop; nothing is stored then.
    """
    session, caller, store = _session(query.session)
    svc = services()
    plan = plan_stream(svc, store, session, query.action)

    def events() -> Iterator[str]:
        yield ": stream open\n\n"
        try:
            for event in run_stream(svc, store, session, plan, caller):
                yield format_sse(event, event=event["type"])
        except Exception as exc:  # noqa: BLE001 - the stream already started: report in-band
            if not isinstance(exc, (ModelError, ApiError)):
                log.exception("storyteller stream failed")
            yield format_sse({"type": "error", "message": _error_message(exc)}, event="error")

    return _with_session(sse_response(events()), session["_id"])


def _close_reason(message: str) -> str:
    data = message.encode()[:120]
    return data.decode("utf-8", "ignore")


def websocket(ws: Any) -> None:
    """WebSocket `/ws`: raw text deltas (original) or `?format=json` messages; 1000 on success, 1011 on error.

    A client message `{"type": "cancel"}` (or the text `cancel`) or a disconnect stops the model stream.
    """
    json_mode = request.args.get("format") == "json"
    action = request.args.get("action", "next")
    svc = services()

    def send(event: dict[str, Any]) -> None:
        if json_mode:
            ws.send(json.dumps(event, ensure_ascii=False, default=str))
        elif event["type"] == "delta" and event["text"]:
            ws.send(event["text"])

    def should_stop() -> bool:
        if not ws.connected:
            return True
        while True:
            try:
                message = ws.receive(timeout=0)
            except ConnectionClosed:
                return True
            if message is None:
                return False
            if _is_cancel(message):
                return True

    try:
        query = StreamQuery.model_validate(
            {k: v for k, v in request.args.items() if k in StreamQuery.model_fields}
        )
        session, caller, store = _session(query.session)
        plan = plan_stream(svc, store, session, action)
        if json_mode:
            ws.send(json.dumps({"type": "start", "session": session["_id"], "kind": plan.kind}))
        for event in run_stream(svc, store, session, plan, caller, should_stop):
            if not ws.connected:
                return
            send(event)
        if ws.connected:
            _close(ws, 1000, "done")
    except ConnectionClosed:
        return
    except Exception as exc:  # noqa: BLE001 - every failure ends the socket with 1011 + reason
        if not isinstance(exc, (ModelError, ApiError)):
            log.exception("storyteller websocket failed")
        message = _error_message(exc) if not hasattr(exc, "errors") else f"invalid query: {exc}"
        try:
            if json_mode:
                ws.send(json.dumps({"type": "error", "message": message}, ensure_ascii=False))
            _close(ws, 1011, _close_reason(message))
        except ConnectionClosed:
            pass


def _close(ws: Any, code: int, reason: str, wait_s: float = 2.0) -> None:
    """Send the close frame, then wait (briefly) for the client's answer before the socket is closed.

    Closing the TCP connection while the client's close reply is still unread makes the kernel send
    a reset, and a browser may then drop the last frames (the error message) and report 1006.
    """
    ws.close(code, reason)
    deadline = time.monotonic() + wait_s
    while ws.close_reason == CloseReason.NO_STATUS_RCVD and time.monotonic() < deadline:
        ws.event.wait(0.05)
        ws.event.clear()


def _is_cancel(message: Any) -> bool:
    if isinstance(message, bytes):
        message = message.decode("utf-8", "ignore")
    text = str(message).strip()
    if text.lower() == "cancel":
        return True
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or nested too deep to parse: not a cancel
        return False
    return isinstance(data, dict) and data.get("type") == "cancel"


def websocket_blueprint(app: Flask) -> Blueprint:
    """The WebSocket route (flask-sock; simple-websocket under werkzeug and gunicorn gthread)."""
    app.config.setdefault("SOCK_SERVER_OPTIONS", {"ping_interval": 25})
    sock = Sock()
    ws_bp = Blueprint("storyteller_ws", __name__)
    sock.route("/ws", bp=ws_bp)(websocket)
    return ws_bp


def init_streams() -> None:
    """Stream tokens for this app's session streams, and the WebSocket's client message in the docs."""
    register_token_scope(TOKEN_KIND, _is_session_stream)
    document_model(CancelMessage)  # the WebSocket's client message (the socket is not an OpenAPI operation)
