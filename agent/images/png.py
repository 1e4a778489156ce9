"""PNG helpers shared by the image providers: encode a Pillow image, verify and normalise image bytes."""

from __future__ import annotations

import io

from PIL import Image, UnidentifiedImageError


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def to_png(data: bytes) -> bytes:
    """Verify that `data` is an image; re-encode as PNG unless it already is one.

    A PNG is checked by its structure and every chunk's CRC (`verify`: a truncated or damaged file
    fails) without decoding its pixels, which costs ~14x as much (about 9 ms against 0.6 ms for a
    1024x576 photo-like image): every generated image passes here, and the image store checks it
    again when it saves it."""
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "PNG":
                img.verify()
                return data
            img.load()
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"not an image: {exc}") from exc
