"""HTTP routes of the storybook app (thin: validate, call the service, shape the reply).

Two faces of one pipeline:
- the original Rotate-Calvary contract (`/get_storybook/`, `/get_updates/<task_id>`,
  `/get_final_output`, `/`), kept field for field for its Next.js frontend: HTTP Basic
  answered as FastAPI did (`401 {"detail": ...}`, checked before the query is validated),
  both `/get_storybook/` and `/get_storybook`, integer task ids (random 53-bit, so the task
  id in a stream URL is a capability, as in the original where the stream had no auth);
- a JSON API in this server's conventions (`/books`, `/books/<id>`, `/books/<id>/events`).
See docs/storybook.md.
"""

from __future__ import annotations

from typing import Any

from flask import Response, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel

from apps.core.auth import authenticate, check_owner, current_user_name, stream_token_route
from apps.core.context import services
from apps.core.doc_models import JobOut
from apps.core.errors import ApiError, error_response
from apps.core.jobs import public_job
from apps.core.openapi import PROTECTED, STREAM_PROTECTED, sse
from apps.core.sse import job_event_stream, last_event_id, sse_response
from apps.core.storage import request_base_url

from . import service
from .responses import BookEvent, BookList, BookOut, FinalOutput, InvalidTask, LegacySnapshot
from .s3 import s3_images
from .schemas import (
    BookBody,
    BookPath,
    FinalOutputQuery,
    HistoryQuery,
    LegacyCreateQuery,
    TaskPath,
    book_params,
)
from .stream import legacy_stream, rich_formatter

bp = APIBlueprint(
    "storybook", __name__, abp_tags=[Tag(name="storybook", description="Rotate-Calvary storybooks")]
)

# endpoints that authenticate before anything else (the original resolved auth before validation)
_AUTH_FIRST = {"get_storybook", "create_book", "list_books", "get_book", "book_events", "cancel_book"}
INVALID_TASK = {"error": "Invalid task id"}


class Healthy(BaseModel):
    status: str


class TaskCreated(BaseModel):
    task_id: int


@bp.before_request
def _auth_first() -> None:
    if request.method == "OPTIONS":  # CORS preflights never carry credentials
        return
    endpoint = (request.endpoint or "").rsplit(".", 1)[-1]
    if endpoint in _AUTH_FIRST or (
        endpoint == "get_final_output" and "task_id" not in request.args and _has_credentials()
    ):
        authenticate()


def _has_credentials() -> bool:
    return bool(request.headers.get("Authorization") or request.headers.get("X-API-Key"))


@bp.errorhandler(ApiError)
def _storybook_error(exc: ApiError) -> Response:
    """401s in the original's FastAPI shape `{"detail": "..."}`; everything else as the server's errors."""
    if exc.status == 401:
        resp = jsonify({"detail": exc.message})
        resp.status_code = 401
        for key, value in exc.headers.items():
            resp.headers[key] = value
        return resp
    return error_response(exc.status, exc.message, code=exc.code, detail=exc.detail, headers=exc.headers)


def _prefix() -> str:
    """The mount this request came through (`/storybook`, or `` under ROOT_APP=storybook)."""
    return "" if request.blueprint and request.blueprint.endswith("_root") else "/storybook"


def _invalid_task() -> Response:
    resp = jsonify(INVALID_TASK)
    resp.status_code = 404
    return resp


# ------------------------------------------------------------------ the original contract


@bp.get("/", strict_slashes=False, responses={200: Healthy})
def health() -> Response:
    """The original's health check."""
    return jsonify({"status": "healthy"})


@bp.get("/get_storybook/", strict_slashes=False, responses={200: TaskCreated}, security=PROTECTED)
def get_storybook(query: LegacyCreateQuery) -> Response:
    """Start a storybook (`des` = story idea, `pgs` = pages); returns `{"task_id": int}` at once."""
    svc = services()
    owner = current_user_name(None)
    params = {
        "description": query.des,
        "pages": query.pgs,
        "style": None,
        "characters": [],
        "main_character": None,
        "setting": None,
        "language": None,
        "model": None,
        "temperature": None,
        "seed": None,
        "chain_images": False,
    }
    doc = service.create_book(svc, params, owner=owner, base_url=request_base_url(), source="legacy")
    return jsonify({"task_id": doc["legacy_id"]})


@bp.get(
    "/get_updates/<task_id>",
    responses={200: sse(LegacySnapshot, "cumulative snapshots (see LegacySnapshot)"), 404: InvalidTask},
)
def get_updates(path: TaskPath) -> Response:
    """SSE of cumulative snapshots `{status, progress: {total: 4, current}, data}` until `done`/`failed`."""
    svc = services()
    job = service.job_by_legacy_id(svc, path.task_id)
    if job is None:
        return _invalid_task()
    stream = legacy_stream(
        svc.jobs, svc.watcher, job, after=last_event_id(), heartbeat_s=svc.settings.SSE_HEARTBEAT_S
    )
    return sse_response(stream)


@bp.get("/get_final_output", responses={200: FinalOutput, 404: InvalidTask}, security=[*PROTECTED, {}])
def get_final_output(query: FinalOutputQuery) -> Response:
    """That task's finished book; without `task_id`, your most recent finished book (`{}` when none)."""
    svc = services()
    if query.task_id is not None:
        job = service.job_by_legacy_id(svc, query.task_id)
        book = service.book_doc(svc, job["_id"]) if job else None
        if book is None:
            return _invalid_task()
        status, error = service.effective_status(book, job)
        if status != "done":
            body: dict[str, Any] = {"final_output": {}, "status": status}
            if error:
                body["error"] = error
            return jsonify(body)
        return jsonify({"final_output": service.final_output_of(book, s3_images(svc)), "status": "done"})
    if svc.settings.AUTH_MODE != "none" and not _has_credentials():
        return jsonify({"final_output": {}})  # an anonymous caller owns no book (and sees nobody else's)
    owner = current_user_name(query.user)
    book = service.latest_finished(svc, owner)
    return jsonify({"final_output": service.final_output_of(book, s3_images(svc)) if book else {}})


# ------------------------------------------------------------------ the JSON API


@bp.post("/books", responses={202: BookOut}, security=PROTECTED)
def create_book(body: BookBody) -> Response:
    """Start a book; 202 with the book (status `queued`) and links to its events."""
    svc = services()
    owner = current_user_name(body.user)
    doc = service.create_book(svc, book_params(body), owner=owner, base_url=request_base_url(), source="api")
    book = service.public_book(doc, svc.jobs.get(doc["_id"]), prefix=_prefix(), s3=s3_images(svc))
    resp = jsonify(book)
    resp.status_code = 202
    resp.headers["Location"] = book["links"]["self"]
    return resp


@bp.get("/books", responses={200: BookList}, security=PROTECTED)
def list_books(query: HistoryQuery) -> Response:
    """A user's books, newest first (auth on: your own; admins may pass `user`)."""
    user = authenticate()
    owner = query.user if user is None or (user.is_admin and query.user) else user.name
    return jsonify({"books": service.history(services(), owner, limit=query.limit, status=query.status)})


def _owned_book(book_id: str) -> tuple[dict[str, Any], dict[str, Any] | None]:
    svc = services()
    book = service.book_doc(svc, book_id)
    if book is None:
        raise ApiError(404, f"no book {book_id}")
    check_owner(book.get("owner"), f"no book {book_id}")
    return book, svc.jobs.get(book_id)


@bp.get("/books/<book_id>", responses={200: BookOut}, security=STREAM_PROTECTED)
@stream_token_route("book_id")
def get_book(path: BookPath) -> Response:
    """One book: status, progress, title, sheet, pages (text, image prompt, picture URL), cover, error."""
    book, job = _owned_book(path.book_id)
    return jsonify(service.public_book(book, job, prefix=_prefix(), s3=s3_images(services())))


@bp.get(
    "/books/<book_id>/events",
    responses={200: sse(BookEvent, "one event per step (see BookEvent)")},
    security=STREAM_PROTECTED,
)
@stream_token_route("book_id")
def book_events(path: BookPath) -> Response:
    """SSE, one event per step: `book.plan`, `page.delta` (text as written), `page.text`, `page.image`,
    `cover`, `stage`, `error`, then `done` (with the whole book) / `failed` / `cancelled`. Resumable."""
    svc = services()
    _owned_book(path.book_id)
    prefix = _prefix()

    def final_book() -> dict[str, Any] | None:
        book = service.book_doc(svc, path.book_id)
        if book is None:
            return None
        return service.public_book(book, svc.jobs.get(path.book_id), prefix=prefix, s3=s3_images(svc))

    stream = job_event_stream(
        svc.jobs,
        svc.watcher,
        path.book_id,
        after=last_event_id(),
        formatter=rich_formatter(final_book),
        heartbeat_s=svc.settings.SSE_HEARTBEAT_S,
    )
    return sse_response(stream)


@bp.delete("/books/<book_id>", responses={200: JobOut}, security=PROTECTED)
def cancel_book(path: BookPath) -> Response:
    """Cancel a queued or running book (same as `DELETE /jobs/<id>`); returns the job."""
    _owned_book(path.book_id)
    return jsonify(public_job(services().jobs.cancel(path.book_id)))
