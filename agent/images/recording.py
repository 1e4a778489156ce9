"""RecordingImageProvider: wraps any image provider so every image is stored and every generation recorded."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from agent.call_context import CallContext
from agent.images.concurrent import generate_on_claims
from agent.records import GenerationRecord, GenerationRecorder
from agent.types import ImageRequest, ImageResult, ModelError, Segmentation

StoreFn = Callable[..., str]


class RecordingImageProvider:
    """Wraps any image provider: stores each image (GridFS) and records the generation."""

    def __init__(
        self, inner: Any, recorder: GenerationRecorder, store: StoreFn | None = None, max_workers: int = 16
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.recorder = recorder
        self.store = store
        self.max_workers = max_workers

    def generate(self, request: ImageRequest) -> ImageResult:
        return self._generate(request, None)

    def _generate(self, request: ImageRequest, claim: Any) -> ImageResult:
        """One image, recorded and stored; on the inner provider's `claim` when `generate_many` got one."""
        ctx = request.context or {}
        prompt = {"prompt": request.prompt, "negative_prompt": request.negative_prompt}
        params = {
            "width": request.width,
            "height": request.height,
            "steps": request.steps,
            "cfg_scale": request.cfg_scale,
            "seed": request.seed,
            "checkpoint": request.checkpoint,
            "sampler": request.sampler_name,
            "img2img": request.init_image is not None,
            "mask": request.mask is not None,
            "denoising_strength": request.denoising_strength if request.init_image else None,
            "controlnet": [
                {k: v for k, v in u.items() if k not in ("image", "input_image")} for u in request.controlnet
            ],
        }
        record = GenerationRecord(
            kind="image",
            provider=self.name,
            context=CallContext.of(ctx),
            template=ctx.get("template"),
            prompt=prompt,
            params=params,
        )
        start = time.perf_counter()
        try:
            result = (
                self.inner.generate(request) if claim is None else self.inner.generate_claimed(request, claim)
            )
            if not result.png:
                raise ModelError(
                    "the image service returned an empty image",
                    provider=self.name,
                    kind="image",
                    retryable=True,
                )
        except ModelError as exc:
            record.error = exc.to_dict()
            record.latency_ms = (time.perf_counter() - start) * 1000
            self.recorder.save(record)
            raise
        if self.store is not None:
            result.image_id = self.store(
                result.png,
                app=ctx.get("app") or "unknown",
                user=ctx.get("user"),
                job=ctx.get("job"),
                kind=ctx.get("kind", "generated"),
                prompt=request.prompt,
                provider=result.provider,
                instance=result.instance,
                session=ctx.get("session"),
                step=ctx.get("step"),
            )
        record.provider = result.provider
        record.instance = result.instance
        record.output = {"image_id": result.image_id, "bytes": len(result.png), "seed": result.seed}
        record.latency_ms = result.latency_ms
        record.extra = {"wait_ms": result.wait_ms, "attempts": result.attempts}
        result.generation_id = self.recorder.save(record)
        return result

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        return generate_on_claims(self.inner, requests, self._generate, self.max_workers)

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        return self.inner.segment(image, text_prompt)

    def health(self) -> dict[str, Any]:
        return self.inner.health()
