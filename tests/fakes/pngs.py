"""Real, small, deterministic PNGs for the fake model servers.

The pixels depend on a key (prompt + seed), so different prompts give different bytes and the
same request gives the same image; a label (e.g. the instance name) is drawn on it so a human
looking at a test artifact can tell where it came from.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re

from PIL import Image, ImageDraw

_DATA_URL = re.compile(r"^data:[^,]*,")


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def render(
    width: int, height: int, key: str, label: str = "", base: Image.Image | None = None
) -> Image.Image:
    """An RGB image: background colour from hash(key), a key-placed block, optional `base` blended in, label."""
    d = digest(key)
    img = Image.new("RGB", (width, height), (d[0], d[1], d[2]))
    draw = ImageDraw.Draw(img)
    # a block whose place and colour also depend on the key (so a colour collision still differs)
    x0, y0 = d[3] * width // 512, d[4] * height // 512
    x1, y1 = x0 + max(1, width // 3), y0 + max(1, height // 3)
    draw.rectangle((x0, y0, x1, y1), fill=(255 - d[0], 255 - d[1], d[5]))
    if base is not None:
        img = Image.blend(img, base.convert("RGB").resize((width, height)), 0.5)
        draw = ImageDraw.Draw(img)
    if label and width >= 16 and height >= 12:
        for i, line in enumerate(label.splitlines()[:4]):
            draw.text((4, 2 + 14 * i), line[:60], fill=(255, 255, 255))
    return img


def to_png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def to_b64(img: Image.Image) -> str:
    """Base64 PNG without a data: prefix (what the WebUI and OpenAI's b64_json return)."""
    return base64.b64encode(to_png(img)).decode("ascii")


def png_bytes(width: int, height: int, key: str, label: str = "") -> bytes:
    return to_png(render(width, height, key, label))


def decode_b64(value: str) -> Image.Image:
    """Base64 (with or without a `data:image/...;base64,` prefix) -> loaded PIL image; ValueError if not one."""
    try:
        raw = base64.b64decode(_DATA_URL.sub("", value.strip()), validate=True)
        img = Image.open(io.BytesIO(raw))
        img.load()
    except Exception as exc:  # binascii.Error, PIL.UnidentifiedImageError, OSError
        raise ValueError(f"not a base64 image: {exc}") from exc
    return img
