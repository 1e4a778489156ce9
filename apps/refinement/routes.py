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
from apps.core.envelope import BusinessException, envelope
from apps.core.image_refs import IMAGE_NOT_FOUND
from apps.core.openapi import PROTECTED

from . import labels as L
from . import store as S
from .refine import RefineService
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
from .service import Client, RefinementService

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


def _base_url() -> str:
    svc = services()
    return (svc.settings.PUBLIC_BASE_URL or request.host_url).rstrip("/")


def _service() -> RefinementService:
    return RefinementService(services(), _base_url())


def _client() -> Client:
    """The caller's address + user agent. Only `remote_addr`: X-Forwarded-For is whatever the client sent;
    behind a trusted proxy (PROXY_FIX_X_FOR>0) ProxyFix has already put the real address there."""
    return Client.from_parts(request.remote_addr, request.headers.get("User-Agent"))


def _auth_name() -> str | None:
    user = authenticate()
    return user.name if user else None


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
    service = _service()
    prompts = service.check(body)
    who = service.attribute(
        auth_user=_auth_name(),
        username=body.username or prompts.username or request.headers.get("X-Username") or None,
        session_id=body.sessionId or prompts.sessionId or request.headers.get("X-Session-Id") or None,
        client=_client(),
    )
    return envelope(service.generate(body, prompts, who))


@bp.post("/paint/start", responses={200: UserStateEnvelope})
def paint_start(body: UsernameBody) -> Response:
    """Log in: find or create the participant's saved state and start a session (`data.sessionId`, ours)."""
    username = current_user_name(body.username)
    if not username:
        raise BusinessException(1, L.MSG_USER_EMPTY)
    return envelope(_service().paint_start(username, _client()))


@bp.post("/paint/save", responses={200: Envelope})
def paint_save(body: SaveBody) -> Response:
    """Save the participant's sketches per stage, design task and current stage."""
    username = current_user_name(body.username)
    if not username or body.data is None:
        raise BusinessException(1, L.MSG_USER_OR_DATA_EMPTY)
    _service().paint_save(username, body.data)
    return envelope(None)


# ------------------------------------------------------------------ history (ours)
@bp.get("/users/<username>/sessions", responses={200: SessionsEnvelope})
def user_sessions(path: UserPath, query: LimitQuery) -> Response:
    """A participant's sessions (one per /paint/start), newest first, with request/stimulus/save counts."""
    check_owner(path.username)
    return envelope(_service().sessions(path.username, query.limit))


@bp.get("/users/<username>/stimuli", responses={200: StimuliEnvelope})
def user_stimuli(path: UserPath, query: StimuliQuery) -> Response:
    """Every stimulus generated for a participant, newest first (image URLs, texts, prompts, provenance)."""
    check_owner(path.username)
    return envelope(_service().stimuli(path.username, query))


@bp.get("/sessions/<session_id>", responses={200: SessionsEnvelope})
def session_detail(path: SessionPath) -> Response:
    """One session: counts and its /generate requests (status, error, stimulus ids)."""
    service = _service()
    data = service.session(path.session_id)
    check_owner(data.get("username"), S.SESSION_NOT_FOUND)
    return envelope(data)


@bp.get("/stimuli/<stimulus_id>", responses={200: Envelope})
def stimulus_detail(path: StimulusPath) -> Response:
    """One stimulus with its image URLs, the text chain that led to it and its provenance."""
    data = _service().stimulus(path.stimulus_id)
    check_owner(data.get("username"), S.STIMULUS_NOT_FOUND)
    return envelope(data)


@bp.get("/requests/<request_id>", responses={200: Envelope})
def request_detail(path: RequestPath) -> Response:
    """One /generate call as stored: inputs (sketch URLs), every step (template, hash, generation id, timing)."""
    data = _service().request(path.request_id)
    check_owner(data.get("username"), S.REQUEST_NOT_FOUND)
    return envelope(data)


# ------------------------------------------------------------------ image refinement (ours)
def _refine_service(image_id: str, username: str | None) -> tuple[RefineService, str | None]:
    service = RefineService(services(), _base_url())
    parent = service.node(image_id)
    check_owner(parent["username"], IMAGE_NOT_FOUND)
    return service, _auth_name() or username


@bp.post("/refine/img2img", responses={200: RefineEnvelope})
def refine_img2img(body: Img2ImgBody) -> Response:
    """A variation of a stimulus image (or of a version): img2img with `strength`; stored as child versions."""
    service, user = _refine_service(body.imageId, body.username)
    return envelope(service.img2img(body, user))


@bp.post("/refine/inpaint", responses={200: RefineEnvelope})
def refine_inpaint(body: InpaintBody) -> Response:
    """Regenerate the masked part (white) of a stimulus image or version; stored as child versions."""
    service, user = _refine_service(body.imageId, body.username)
    return envelope(service.inpaint(body, user))


@bp.get("/refine/tree/<image_id>", responses={200: TreeEnvelope})
def refine_tree(path: ImageIdPath) -> Response:
    """The version tree that contains an image, from its root (the stimulus image): nested `children`."""
    service = RefineService(services(), _base_url())
    tree, owner = service.tree(path.image_id)
    check_owner(owner, IMAGE_NOT_FOUND)
    return envelope(tree)
