"""PNG helpers shared by the image providers: encode a Pillow image, verify and normalise image bytes."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_png(data: bytes) -> bytes:
    """Verify that `data` is an image; re-encode as PNG unless it already is one."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            if img.format == "PNG":
                return data
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ValueError(f"not an image: {exc}") from exc
