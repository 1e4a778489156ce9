"""Images in GridFS, served by unguessable URL.

Bytes are checked by content (Pillow), not by name or declared type, and limited
in size and dimensions. Ids are random tokens so a URL cannot be guessed from
another one. `/images/<id>.png` ends in `.png` because StepIdeator's frontend only
renders URLs that end in an image extension.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import re
import secrets
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import gridfs
from cachetools import TTLCache
from flask import current_app, has_request_context, request
from PIL import Image, UnidentifiedImageError
from pymongo.database import Database

from . import gridfs_files
from .db import IMAGES_BUCKET, gridfs_bucket, research_write_concern
from .errors import ApiError

ALLOWED_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_DATA_URL = re.compile(r"^data:(?P<mime>[\w/+.-]+)?(;[\w=.-]+)*;base64,", re.IGNORECASE)
ID_PATTERN = r"[A-Za-z0-9_-]{16,40}"


@dataclass
class StoredImage:
    id: str
    content_type: str
    length: int
    md5: str
    metadata: dict[str, Any]
    uploaded: datetime


def create_indexes(db: Database) -> None:
    gridfs_files.ensure_indexes(db[f"{IMAGES_BUCKET}.files"], db[f"{IMAGES_BUCKET}.chunks"])  # GridFS's own
    db["images.files"].create_index([("metadata.app", 1), ("metadata.user", 1), ("uploadDate", -1)])
    db["images.files"].create_index("metadata.job")


def decode_base64_image(value: str, *, field: str = "image") -> bytes:
    """Accept raw base64 or a data URL; raise a 422 ApiError on garbage."""
    if not isinstance(value, str) or not value.strip():
        raise ApiError(422, f"{field}: empty image")
    text = _DATA_URL.sub("", value.strip(), count=1)
    try:
        return base64.b64decode(text + "=" * (-len(text) % 4), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise ApiError(422, f"{field}: not valid base64 ({exc})") from exc


def to_base64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def to_data_url(data: bytes, content_type: str = "image/png") -> str:
    return f"data:{content_type};base64,{to_base64(data)}"


def inspect_image(
    data: bytes, *, max_bytes: int, max_side: int, field: str = "image"
) -> tuple[str, int, int]:
    """Return (content_type, width, height) or raise 413/415/422."""
    if not data:
        raise ApiError(422, f"{field}: empty image")
    if len(data) > max_bytes:
        raise ApiError(413, f"{field}: image too large ({len(data)} bytes, limit {max_bytes})")
    try:
        with warnings.catch_warnings():
            # Pillow warns (above MAX_IMAGE_PIXELS) or raises (above twice that) while reading the header;
            # both mean "a decompression bomb": refuse before a single pixel is decoded
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                fmt = img.format or ""
                width, height = img.size
                _check_side(width, height, max_side, field)  # from the header only
                img.verify()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ApiError(422, f"{field}: image dimensions too large (limit {max_side}px per side)") from exc
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ApiError(415, f"{field}: not a PNG, JPEG or WebP image") from exc
    if fmt not in ALLOWED_FORMATS:
        raise ApiError(415, f"{field}: unsupported image format {fmt or 'unknown'} (PNG, JPEG or WebP)")
    return ALLOWED_FORMATS[fmt], width, height


def _check_side(width: int, height: int, max_side: int, field: str) -> None:
    if width > max_side or height > max_side or width < 1 or height < 1:
        raise ApiError(422, f"{field}: image {width}x{height} exceeds {max_side}px per side")


class _RecentImages:
    """Recently served images of this process (they never change once saved), bounded in bytes.

    `GET /images/<id>.png` is the commonest read of a study (every page view shows a few), and
    without this it costs three database round trips. Entries live `ttl_s` at most, so an image
    deleted through another worker stops being served from here within that time.
    """

    def __init__(self, max_bytes: int, ttl_s: float) -> None:
        self.max_bytes = max_bytes
        self._items: TTLCache[str, tuple[StoredImage, bytes]] = TTLCache(
            maxsize=max_bytes, ttl=ttl_s, getsizeof=lambda item: len(item[1])
        )
        self._lock = threading.Lock()  # cachetools' caches are not thread-safe

    def get(self, image_id: str) -> tuple[StoredImage, bytes] | None:
        with self._lock:
            return self._items.get(image_id)

    def put(self, info: StoredImage, data: bytes) -> None:
        if len(data) > self.max_bytes // 8:  # one big image must not flush everything else
            return
        with self._lock:
            self._items[info.id] = (info, data)

    def forget(self, image_id: str) -> None:
        with self._lock:
            self._items.pop(image_id, None)


class ImageStore:
    """Save and load images; callers never touch GridFS directly."""

    def __init__(
        self,
        db: Database,
        *,
        max_bytes: int,
        max_side: int,
        cache_bytes: int = 64 << 20,
        cache_ttl_s: float = 60.0,
    ) -> None:
        self.db = db
        self.bucket = gridfs_bucket(db)  # reads and deletes; writes go through gridfs_files (two inserts)
        durable = research_write_concern(db.write_concern)
        self._files = db.get_collection(f"{IMAGES_BUCKET}.files", write_concern=durable)
        self._chunks = db.get_collection(f"{IMAGES_BUCKET}.chunks", write_concern=durable)
        self.max_bytes = max_bytes
        self.max_side = max_side
        self._recent = _RecentImages(cache_bytes, cache_ttl_s) if cache_bytes > 0 else None

    def fetch(self, image_id: str) -> tuple[StoredImage, bytes] | None:
        """(info, bytes) of an image, or None: from this process's recent images when it can."""
        if self._recent is not None and (hit := self._recent.get(image_id)) is not None:
            return hit
        info = self.info(image_id)
        if info is None:
            return None
        try:
            data = self.load(image_id)
        except ApiError:  # deleted between the two reads
            return None
        if self._recent is not None:
            self._recent.put(info, data)
        return info, data

    def save(
        self,
        data: bytes,
        *,
        app: str,
        user: str | None = None,
        kind: str = "generated",
        job: str | None = None,
        **metadata: Any,
    ) -> str:
        content_type, width, height = inspect_image(data, max_bytes=self.max_bytes, max_side=self.max_side)
        image_id = secrets.token_urlsafe(18)
        meta = {
            "app": app,
            "user": user,
            "kind": kind,
            "job": job,
            "contentType": content_type,
            "width": width,
            "height": height,
            "sha256": hashlib.sha256(data).hexdigest(),
            **{k: v for k, v in metadata.items() if v is not None},
        }
        gridfs_files.write_file(
            self._files, self._chunks, image_id, f"{image_id}.{EXTENSIONS[content_type]}", data, meta
        )
        return image_id

    def info(self, image_id: str) -> StoredImage | None:
        doc = self.db["images.files"].find_one({"_id": image_id})
        if not doc:
            return None
        meta = doc.get("metadata") or {}
        return StoredImage(
            id=image_id,
            content_type=meta.get("contentType", "image/png"),
            length=doc["length"],
            md5=meta.get("sha256", "")[:32],
            metadata=meta,
            uploaded=doc.get("uploadDate") or datetime.now(UTC),
        )

    def load(self, image_id: str) -> bytes:
        try:
            return self.bucket.open_download_stream(image_id).read()
        except gridfs.errors.NoFile as exc:
            raise ApiError(404, f"no image {image_id}") from exc

    def delete(self, image_id: str) -> None:
        if self._recent is not None:
            self._recent.forget(image_id)
        try:
            self.bucket.delete(image_id)
        except gridfs.errors.NoFile:
            return


def image_path(image_id: str) -> str:
    """The server-relative URL of an image."""
    return f"/images/{image_id}.png"


def absolute_image_url(image_id: str, base_url: str | None = None) -> str:
    """An absolute URL (PUBLIC_BASE_URL, else the current request's host) ending in `.png`.

    Frontends on another origin (StepIdeator's Next.js app) need absolute URLs; jobs running
    outside a request pass `base_url` captured when the job was created.
    """
    base = base_url
    if base is None:
        configured = _public_base_url() if has_request_context() else None
        base = configured or (request.host_url if has_request_context() else "")
    return base.rstrip("/") + image_path(image_id)


def _public_base_url() -> str | None:
    """PUBLIC_BASE_URL of the current app (read from its Settings, not from Services: no import cycle)."""
    return current_app.config["SETTINGS"].PUBLIC_BASE_URL


def request_base_url() -> str:
    """The base URL to *store* with a job or record: PUBLIC_BASE_URL, else "" (server-relative URLs).

    Never the request's Host header: a client chooses it, and whatever is stored is later served to
    others. Relative URLs are made absolute when answering (`answer_base_url`, `absolute_image_urls`).
    """
    return (_public_base_url() or "").rstrip("/")


def answer_base_url() -> str:
    """The base for URLs in *this* answer: PUBLIC_BASE_URL, else the current request's host."""
    if not has_request_context():
        return ""
    return (_public_base_url() or request.host_url).rstrip("/")


_IMAGE_PREFIX = "/images/"


def absolute_image_urls(value: Any, base: str | None = None) -> Any:
    """A JSON value with every stored server-relative image URL ("/images/...") made absolute.

    Stored records and events hold relative URLs (see `request_base_url`); answers keep the
    absolute URLs the frontends were built against.
    """
    base = answer_base_url() if base is None else base.rstrip("/")
    if not base:
        return value
    return _map_strings(value, lambda text: base + text if text.startswith(_IMAGE_PREFIX) else text)


def relative_image_urls(value: Any, base: str | None) -> Any:
    """The inverse for storing: absolute URLs of ours under `base` become server-relative."""
    if not base:
        return value
    root = base.rstrip("/")
    prefix = root + _IMAGE_PREFIX
    return _map_strings(value, lambda text: text[len(root) :] if text.startswith(prefix) else text)


def _map_strings(node: Any, fn: Callable[[str], str]) -> Any:
    """A copy of a JSON value with `fn` applied to every string in it (not to keys)."""
    if isinstance(node, str):
        return fn(node)
    if isinstance(node, dict):
        return {k: _map_strings(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_strings(v, fn) for v in node]
    return node
