"""Server-wide routes: ping, health, images, jobs (status, cancel, events), OpenAPI document."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, jsonify, make_response, redirect, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, Field

from .auth import authenticate, check_owner, stream_token_route
from .context import services
from .doc_models import HealthOut, JobEvent, JobOut
from .errors import ApiError
from .health import health_report
from .image_refs import read_image
from .jobs import public_job
from .openapi import PROTECTED, STREAM_PROTECTED, raw, sse
from .sse import job_event_stream, last_event_id, sse_response
from .storage import ID_PATTERN, absolute_image_urls

core_bp = APIBlueprint("core", __name__, abp_tags=[Tag(name="server", description="Health, images and jobs")])


# images: with IMAGE_ACCESS=owner and auth on, only the owner (credentials or a job's stream token) reads one
IMAGE_SECURITY = [*STREAM_PROTECTED, {}]


class ImagePath(BaseModel):
    image_id: str = Field(pattern=f"^{ID_PATTERN}$", description="id from an image URL")


class JobPath(BaseModel):
    job_id: str = Field(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")


@core_bp.route("/ping", methods=["GET", "POST"])
def ping() -> Response:
    """Liveness: plain text `pong` (the seeds' contract)."""
    resp = make_response("pong")
    resp.mimetype = "text/plain"
    return resp


@core_bp.get("/health", responses={200: HealthOut, 503: HealthOut})
def health() -> Response:
    """Readiness: database, model, images and prompts probed (cached a few seconds); 200 only when all are ok.

    503 with `status` degraded (a part fails; `problems` says which, why and what to do) or down
    (no database). Liveness is `/ping`.
    """
    body, status = health_report(current_app)
    resp = jsonify(body)
    resp.status_code = status
    return resp


@core_bp.get(
    "/images/<image_id>.png",
    responses={200: raw("image/png", "the image", {"type": "string", "format": "binary"})},
    security=IMAGE_SECURITY,
)
def get_image(path: ImagePath) -> Response:
    """An image by its unguessable id, with ETag and long-lived caching (images never change)."""
    svc = services()

    info, data = read_image(svc, path.image_id)
    etag = info.metadata.get("sha256", path.image_id)
    if request.if_none_match and etag in request.if_none_match:
        resp = Response(status=304)
    else:
        resp = Response(data, mimetype=info.content_type)
        resp.headers["Content-Length"] = str(len(data))
    resp.set_etag(etag)
    resp.headers["Cache-Control"] = "private, max-age=31536000, immutable"
    _image_cors(resp, svc.settings)
    return resp


def _image_cors(resp: Response, settings: Any) -> None:
    """Images are cached for a year: a browser that loaded one with `<img>` (no Origin) answers a later
    `fetch()` of the same URL from its cache. `Vary: Origin` always keys that cache by Origin, and where
    anyone with the link may read the image (auth off, or IMAGE_ACCESS=link) it is `*` for everyone, so
    even the cached copy passes CORS. A listed origin still gets its own echo (flask-cors) with credentials."""
    resp.vary.add("Origin")
    if settings.AUTH_MODE != "none" and settings.IMAGE_ACCESS != "link":
        return
    origin = request.headers.get("Origin")
    listed = [o for o in settings.CORS_ORIGINS if o != "*"]
    if origin and "*" not in settings.CORS_ORIGINS and origin.lower() in (o.lower() for o in listed):
        return
    resp.headers["Access-Control-Allow-Origin"] = "*"
    resp.headers["Access-Control-Expose-Headers"] = "Content-Type, ETag"


@core_bp.get("/jobs/<job_id>", responses={200: JobOut}, security=STREAM_PROTECTED)
@stream_token_route("job_id")
def get_job(path: JobPath) -> Response:
    """Snapshot of a job: status, progress, data, error."""
    doc = _owned_job(path.job_id)
    return jsonify(absolute_image_urls(public_job(doc)))


@core_bp.delete("/jobs/<job_id>", responses={200: JobOut}, security=PROTECTED)
def cancel_job(path: JobPath) -> Response:
    """Cancel a queued or running job (running jobs stop at their next step)."""
    _owned_job(path.job_id)
    doc = services().jobs.cancel(path.job_id)
    return jsonify(public_job(doc))


@core_bp.get(
    "/jobs/<job_id>/events",
    responses={200: sse(JobEvent, "the job's events (see JobEvent)")},
    security=STREAM_PROTECTED,
)
@stream_token_route("job_id")
def job_events(path: JobPath) -> Response:
    """Server-Sent Events of a job; resumable with Last-Event-ID; heartbeat comments."""
    svc = services()
    _owned_job(path.job_id)
    stream = job_event_stream(
        svc.jobs, svc.watcher, path.job_id, after=last_event_id(), heartbeat_s=svc.settings.SSE_HEARTBEAT_S
    )
    return sse_response(stream)


def _owned_job(job_id: str) -> dict[str, Any]:

    authenticate()  # credentials first: an unauthenticated probe gets 401, never "no job"
    doc = services().jobs.get(job_id)
    if doc is None:
        raise ApiError(404, f"no job {job_id}")
    check_owner(doc.get("owner"), f"no job {job_id}")
    return doc


def register_doc_routes(app: Any) -> None:
    """`/openapi.json` and `/docs` at the root (flask-openapi3 serves them under /docs/)."""

    @app.get("/openapi.json", doc_ui=False)
    def openapi_json() -> Response:
        return jsonify(app.api_doc)

    @app.get("/docs", doc_ui=False)
    def docs_root() -> Response:
        return redirect("/docs/swagger", code=302)
