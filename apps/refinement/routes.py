"""HTTP routes of the refinement app (InsPilot's contract + history + image refinement).

Thin: validate, resolve who is calling, call the service, wrap the reply in the
envelope `{success, code, message, data}` the InsPilot frontend reads (our own routes
use it too, so every reply of this blueprint has one shape).
"""

from __future__ import annotations

from flask import Response, make_response, request
from flask_openapi3 import APIBlueprint, Tag

from apps.core.auth import authenticate, check_owner, current_user_name
from apps.core.context import services
from apps.core.envelope import envelope
from apps.core.openapi import PROTECTED

from .attribution import Caller, Client
from .schemas import (
    Envelope,
    GenerateBody,
    GenerateEnvelope,
    ImageIdPath,
    Img2ImgBody,
    InpaintBody,
    LimitQuery,
    RefineEnvelope,
    RequestPath,
    SaveBody,
    SessionPath,
    SessionsEnvelope,
    StimuliEnvelope,
    StimuliQuery,
    StimulusPath,
    TreeEnvelope,
    UsernameBody,
    UserPath,
    UserStateEnvelope,
)
from .service import StimulusService
from .versions import VersionService

bp = APIBlueprint(
    "refinement",
    __name__,
    abp_tags=[Tag(name="refinement", description="InsPilot / Refinity")],
    abp_security=PROTECTED,
)


@bp.before_request
def _auth_first() -> None:
    """Credentials before any lookup: with auth on, an unauthenticated id probe gets 401, never 404."""
    if request.method != "OPTIONS" and (request.endpoint or "").rsplit(".", 1)[-1] != "ping":
        authenticate()


def _caller() -> Caller:
    """Who is calling. The client is only `remote_addr`: X-Forwarded-For is whatever the client sent;
    behind a trusted proxy (PROXY_FIX_X_FOR>0) ProxyFix has already put the real address there."""
    user = authenticate()
    return Caller(
        auth_user=user.name if user else None,
        client=Client.from_parts(request.remote_addr, request.headers.get("User-Agent")),
        base_url=(services().settings.PUBLIC_BASE_URL or request.host_url).rstrip("/"),
        check_owner=check_owner,
        username_header=request.headers.get("X-Username"),
        session_header=request.headers.get("X-Session-Id"),
    )


def _stimuli() -> StimulusService:
    return StimulusService(services())


def _versions() -> VersionService:
    return VersionService(services())


@bp.route("/ping", methods=["GET", "POST"])
def ping() -> Response:
    """Liveness: plain text `pong` (not enveloped, like the original)."""
    resp = make_response("pong")
    resp.mimetype = "text/plain"
    return resp


@bp.post("/generate", responses={200: GenerateEnvelope})
def generate(body: GenerateBody) -> Response:
    """Stimuli for one stage: type 0 rapid divergence, 1 deep divergence, 2 convergence naming + recommendation,
    3 convergence stimuli. Images are raw base64 PNG. Ours (additive): `data.requestId`, `data.stimulusIds`."""
    return envelope(_stimuli().generate(body.root, _caller()))


@bp.post("/paint/start", responses={200: UserStateEnvelope})
def paint_start(body: UsernameBody) -> Response:
    """Log in: find or create the participant's saved state and start a session (`data.sessionId`, ours)."""
    return envelope(_stimuli().paint_start(current_user_name(body.username), _caller()))


@bp.post("/paint/save", responses={200: Envelope})
def paint_save(body: SaveBody) -> Response:
    """Save the participant's sketches per stage, design task and current stage."""
    _stimuli().paint_save(current_user_name(body.username), body.data)
    return envelope(None)


# ------------------------------------------------------------------ history (ours)
@bp.get("/users/<username>/sessions", responses={200: SessionsEnvelope})
def user_sessions(path: UserPath, query: LimitQuery) -> Response:
    """A participant's sessions (one per /paint/start), newest first, with request/stimulus/save counts."""
    return envelope(_stimuli().sessions(path.username, query.limit, _caller()))


@bp.get("/users/<username>/stimuli", responses={200: StimuliEnvelope})
def user_stimuli(path: UserPath, query: StimuliQuery) -> Response:
    """Every stimulus generated for a participant, newest first (image URLs, texts, prompts, provenance)."""
    return envelope(_stimuli().stimuli(path.username, query, _caller()))


@bp.get("/sessions/<session_id>", responses={200: SessionsEnvelope})
def session_detail(path: SessionPath) -> Response:
    """One session: counts and its /generate requests (status, error, stimulus ids)."""
    return envelope(_stimuli().session(path.session_id, _caller()))


@bp.get("/stimuli/<stimulus_id>", responses={200: Envelope})
def stimulus_detail(path: StimulusPath) -> Response:
    """One stimulus with its image URLs, the text chain that led to it and its provenance."""
    return envelope(_stimuli().stimulus(path.stimulus_id, _caller()))


@bp.get("/requests/<request_id>", responses={200: Envelope})
def request_detail(path: RequestPath) -> Response:
    """One /generate call as stored: inputs (sketch URLs), every step (template, hash, generation id, timing)."""
    return envelope(_stimuli().request(path.request_id, _caller()))


# ------------------------------------------------------------------ image refinement (ours)
@bp.post("/refine/img2img", responses={200: RefineEnvelope})
def refine_img2img(body: Img2ImgBody) -> Response:
    """A variation of a stimulus image (or of a version): img2img with `strength`; stored as child versions."""
    return envelope(_versions().img2img(body, _caller()))


@bp.post("/refine/inpaint", responses={200: RefineEnvelope})
def refine_inpaint(body: InpaintBody) -> Response:
    """Regenerate the masked part (white) of a stimulus image or version; stored as child versions."""
    return envelope(_versions().inpaint(body, _caller()))


@bp.get("/refine/tree/<image_id>", responses={200: TreeEnvelope})
def refine_tree(path: ImageIdPath) -> Response:
    """The version tree that contains an image, from its root (the stimulus image): nested `children`."""
    return envelope(_versions().tree(path.image_id, _caller()))
