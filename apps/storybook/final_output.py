"""Picture URLs of a stored book and the original's `final_output` object built from it."""

from __future__ import annotations

from typing import Any

from apps.core.storage import absolute_image_url

from .s3 import S3Images


def picture_url(entry: dict[str, Any], base_url: str | None, s3: S3Images | None = None) -> str | None:
    """A stored page's/cover's URL: a freshly signed S3 URL when it has an S3 copy, else ours."""
    if s3 is not None and entry.get("s3_key"):
        return s3.url(entry["s3_key"])
    image_id = entry.get("image_id")
    return absolute_image_url(image_id, base_url) if image_id else None


def legacy_final_output(
    doc: dict[str, Any], base_url: str | None = None, s3: S3Images | None = None
) -> dict[str, Any]:
    """The original's `final_output` object (+ `cover`) from a stored book."""
    base = base_url or doc.get("base_url") or None
    pages = doc.get("pages") or []
    params = doc.get("input") or {}

    out = {
        "user_input": params.get("description"),
        "total_pages": params.get("pages"),
        "title": doc.get("title"),
        "text_description": [pg.get("text") or "" for pg in pages],
        "image_description": [pg.get("scene") or "" for pg in pages],
        "illustrations": [picture_url(pg, base, s3) for pg in pages],
    }
    cover = doc.get("cover") or {}
    if cover.get("image_id"):
        out["cover"] = picture_url(cover, base, s3)
    return out
