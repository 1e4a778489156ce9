"""The placeholder image provider: Pillow-drawn cards, so every workflow runs with no image service.

The placeholder is the offline default when no SD instance is configured. It is
honest about what it is: its name is "placeholder" and every image it draws says
PLACEHOLDER in large letters, with the prompt it stood in for.
"""

from __future__ import annotations

import hashlib
import io
import textwrap
import time
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps

from agent.images.png import png_bytes
from agent.types import ImageRequest, ImageResult, ModelError, Segmentation


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # very old Pillow
        return ImageFont.load_default()


class PlaceholderImageProvider:
    """Draws a labelled card with Pillow: every workflow runs end to end with no image service."""

    name = "placeholder"

    def __init__(self, max_side: int = 2048) -> None:
        self.max_side = max_side

    def generate(self, request: ImageRequest) -> ImageResult:
        start = time.perf_counter()
        width = max(64, min(request.width, self.max_side))
        height = max(64, min(request.height, self.max_side))
        digest = hashlib.sha256(f"{request.prompt}|{request.seed}".encode()).digest()
        background = (160 + digest[0] % 80, 160 + digest[1] % 80, 160 + digest[2] % 80)
        if request.init_image:
            with Image.open(io.BytesIO(request.init_image)) as src:
                img = ImageOps.fit(src.convert("RGB"), (width, height))
            img = Image.blend(img, Image.new("RGB", (width, height), background), 0.5)
        else:
            img = Image.new("RGB", (width, height), background)
        draw = ImageDraw.Draw(img)
        border = max(4, width // 64)
        draw.rectangle([0, 0, width - 1, height - 1], outline=(40, 40, 40), width=border)
        big = _font(max(14, width // 10))
        draw.text((width // 2, height // 6), "PLACEHOLDER", fill=(20, 20, 20), font=big, anchor="mm")
        small = _font(max(10, width // 32))
        label = (request.label + ": ") if request.label else ""
        body = textwrap.fill(
            label + (request.prompt or "(no prompt)"), width=max(16, width // max(6, width // 42))
        )
        lines = body.splitlines()[: max(1, (height // 2) // max(12, width // 28))]
        draw.multiline_text(
            (width // 12, height // 3), "\n".join(lines), fill=(30, 30, 30), font=small, spacing=4
        )
        draw.text(
            (width // 2, height - height // 12),
            "no image service configured",
            fill=(60, 60, 60),
            font=small,
            anchor="mm",
        )
        data = png_bytes(img)
        return ImageResult(
            png=data,
            provider=self.name,
            instance=None,
            seed=request.seed,
            latency_ms=(time.perf_counter() - start) * 1000,
            info={"placeholder": True, "width": width, "height": height},
        )

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        return [self.generate(r) for r in requests]

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        """A placeholder cut-out: everything darker than the paper is 'the object'."""
        try:
            with Image.open(io.BytesIO(image)) as src:
                rgb = src.convert("RGB")
        except OSError as exc:
            raise ModelError(
                f"cannot read the image to segment: {exc}", provider=self.name, kind="image"
            ) from exc
        gray = ImageOps.grayscale(rgb)
        mask = gray.point(lambda v: 255 if v < 235 else 0).convert("L")
        white = Image.new("RGB", rgb.size, (255, 255, 255))
        cutout = Image.composite(rgb, white, mask)
        return Segmentation(mask=png_bytes(mask), cutout=png_bytes(cutout), provider="placeholder-threshold")

    def health(self) -> dict[str, Any]:
        return {"ok": True, "provider": self.name, "note": "placeholder images (no SD instance configured)"}
