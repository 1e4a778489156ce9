"""SDPoolProvider: the ImageProvider over the shared SD WebUI pool (txt2img/img2img with ControlNet, SAM)."""

from __future__ import annotations

import io
import threading
from typing import Any

from PIL import Image
from pymongo.database import Database
from pymongo.errors import PyMongoError

from agent.images.concurrent import generate_on_claims
from agent.images.placeholder import PlaceholderImageProvider
from agent.images.png import png_bytes
from agent.images.sdwebui.client import (
    PROVIDER,
    SDClient,
    SDError,
    b64encode,
    build_payload,
    decode_first_image,
    decode_image_value,
    parse_info,
)
from agent.images.sdwebui.pool import SDInstancePool
from agent.images.sdwebui.queue import Lease
from agent.types import ImageRequest, ImageResult, Segmentation


def _flatten_on_white(png: bytes) -> bytes:
    """SAM cut-outs can be transparent outside the object; the apps want it on white (as the original)."""
    with Image.open(io.BytesIO(png)) as img:
        rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return png_bytes(Image.alpha_composite(white, rgba).convert("RGB"))


def _as_mask(png: bytes) -> bytes:
    with Image.open(io.BytesIO(png)) as img:
        return png_bytes(img.convert("L"))


class SDPoolProvider:
    """ImageProvider over the shared SD WebUI pool: txt2img/img2img with ControlNet, SAM cut-outs."""

    name = PROVIDER

    def __init__(
        self, pool: SDInstancePool, *, sam_enabled: bool = False, max_workers: int = 16, max_side: int = 4096
    ) -> None:
        self.pool = pool
        self.sam_enabled = sam_enabled
        self.max_workers = max_workers
        self._fallback = PlaceholderImageProvider(max_side=max_side)

    @classmethod
    def from_settings(
        cls, settings: Any, db: Database | None, *, refresh_checkpoints: bool = True, **pool_kwargs: Any
    ) -> SDPoolProvider:
        if db is None:
            raise ValueError("IMAGE_PROVIDER=sdwebui needs MongoDB: the pool shares its instances through it")
        pool = SDInstancePool(
            db,
            list(settings.SD_INSTANCES),
            timeout_s=settings.SD_TIMEOUT_S,
            wait_timeout_s=settings.SD_WAIT_TIMEOUT_S,
            lease_s=settings.SD_LEASE_S,
            max_attempts=settings.SD_MAX_ATTEMPTS,
            **{"depth": settings.SD_QUEUE_DEPTH, "send_ahead_s": settings.SD_SEND_AHEAD_S, **pool_kwargs},
        )
        if refresh_checkpoints:  # learn which checkpoint each instance has loaded, without delaying start-up
            threading.Thread(target=pool.refresh_checkpoints, name="sd-checkpoints", daemon=True).start()
        return cls(pool, sam_enabled=settings.SD_SAM_ENABLED, max_side=settings.MAX_IMAGE_SIDE)

    def generate(self, request: ImageRequest) -> ImageResult:
        return self.generate_claimed(request, None)

    def claim_many(self, requests: list[ImageRequest]) -> list[Lease | None]:
        """On an idle pool, the idle instances for the first images, claimed in one go
        (`SDInstancePool.claim_idle`), so they start together; None for the rest (`agent.types.ClaimsAhead`)."""
        checkpoints = {r.checkpoint for r in requests}
        leases: list[Lease | None] = []
        if len(requests) > 1 and len(checkpoints) == 1:
            leases.extend(self.pool.claim_idle(min(len(requests), self.max_workers), checkpoints.pop()))
        return leases + [None] * (len(requests) - len(leases))

    def generate_claimed(self, request: ImageRequest, lease: Lease | None) -> ImageResult:
        """One image; its first attempt on `lease` when one was claimed for it (`claim_many`)."""
        try:
            endpoint, payload = build_payload(request)
        except BaseException:
            if lease is not None:
                self.pool.release(lease, ok=True)  # not used: the next caller may have it
            raise

        def call(client: SDClient) -> tuple[tuple[bytes, dict[str, Any]], str | None]:
            response = client.post(endpoint, payload)
            png = decode_first_image(response, client.base_url)
            info = parse_info(response)
            return (png, info), info.get("sd_model_checkpoint") or request.checkpoint

        (png, info), run = self.pool.run(call, checkpoint=request.checkpoint, lease=lease)
        seed = info.get("seed")
        return ImageResult(
            png=png,
            provider=self.name,
            instance=run.instance,
            seed=seed if isinstance(seed, int) else request.seed,
            latency_ms=run.latency_ms,
            wait_ms=run.wait_ms,
            attempts=run.attempts,
            info={
                "endpoint": endpoint,
                "checkpoint": info.get("sd_model_checkpoint") or request.checkpoint,
                "errors": run.errors,
            },
        )

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        """All at once: the pool hands them out as instances free up; results in request order."""
        return generate_on_claims(
            self, requests, self.generate_claimed, self.max_workers, thread_name_prefix="sd"
        )

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        """Cut the object named `text_prompt` out with the WebUI's segment-anything extension (+ GroundingDINO).

        With SD_SAM_ENABLED off, the placeholder's threshold cut-out is used and its provider
        name says so.
        """
        if not self.sam_enabled:
            seg = self._fallback.segment(image, text_prompt)
            seg.provider = "placeholder-threshold (SD_SAM_ENABLED is off)"
            return seg
        payload = {
            "input_image": b64encode(image),
            "dino_enabled": True,
            "dino_text_prompt": text_prompt,
            "dino_preview_checkbox": False,
        }

        def call(client: SDClient) -> tuple[Segmentation, None]:
            response = client.sam_predict(payload)
            masks = response.get("masks") or []
            cutouts = response.get("masked_images") or []
            if not masks or not cutouts:
                raise SDError(
                    f"segment-anything found no {text_prompt!r} in the image: {response.get('msg')}",
                    failure="client",
                    instance=client.base_url,
                    retryable=False,
                )
            i = 1 if len(masks) > 1 and len(cutouts) > 1 else 0  # the original used the second candidate
            mask = decode_image_value(masks[i], instance=client.base_url, what="mask")
            cutout = decode_image_value(cutouts[i], instance=client.base_url, what="cut-out")
            return Segmentation(
                mask=_as_mask(mask), cutout=_flatten_on_white(cutout), provider="sdwebui-sam"
            ), None

        seg, _ = self.pool.run(call, what="segmentation")
        return seg

    def health(self) -> dict[str, Any]:
        """The pool's shared view plus a ping of every instance: ok when at least one answers."""
        answers = self.pool.answering()
        try:
            out = self.pool.health()
        except PyMongoError as exc:
            out = {
                "ok": False,
                "provider": self.name,
                "error": f"database: {exc}",
                "instances": [{"url": u} for u in self.pool.urls],
            }
        for row in out["instances"]:
            row["answers"] = answers.get(row["url"], False)
        out["answering"] = sum(answers.values())
        out["sam"] = self.sam_enabled
        if "error" in out:  # the shared state cannot be read: no lease can be taken either
            return out
        # an answering instance the pool still marks down rejoins at its next probe; callers wait for it
        out["ok"] = out["answering"] > 0
        if not out["ok"]:
            out["error"] = (
                f"no SD instance answers GET /sdapi/v1/progress within {self.pool.ping_timeout_s:g} s: "
                + ", ".join(self.pool.urls)
            )
        return out

    def stats(self) -> dict[str, Any]:
        return self.pool.stats()

    def interrupt_held(self) -> int:
        return self.pool.interrupt_held()

    def close(self) -> None:
        self.pool.close()
