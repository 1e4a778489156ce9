"""Build the configured providers from Settings; the only place that knows them all."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pymongo.database import Database

from agent.images import PlaceholderImageProvider
from agent.llm import LLM
from agent.records import GenerationRecorder
from agent.types import ImageProvider, ImageRequest, ImageResult, LLMProvider, ModelError, Segmentation
from config import Settings

log = logging.getLogger(__name__)

StoreFn = Callable[..., str]


def build_llm_provider(settings: Settings) -> LLMProvider:
    from agent.providers.openai_compat import OpenAICompatProvider

    if settings.LLM_PROVIDER == "azure":
        if not (settings.AZURE_OPENAI_ENDPOINT and settings.AZURE_OPENAI_DEPLOYMENT):
            raise ValueError("LLM_PROVIDER=azure needs AZURE_OPENAI_ENDPOINT and AZURE_OPENAI_DEPLOYMENT")
        return OpenAICompatProvider.azure(
            endpoint=settings.AZURE_OPENAI_ENDPOINT,
            api_key=settings.AZURE_OPENAI_API_KEY,
            api_version=settings.AZURE_OPENAI_API_VERSION,
            deployment=settings.AZURE_OPENAI_DEPLOYMENT,
            timeout=settings.LLM_TIMEOUT_S,
            vision_deployment=settings.VISION_MODEL,
        )
    if settings.LLM_PROVIDER == "openai":
        return OpenAICompatProvider.openai(
            base_url=settings.OPENAI_BASE_URL,
            api_key=settings.OPENAI_API_KEY,
            model=settings.LLM_MODEL,
            timeout=settings.LLM_TIMEOUT_S,
            vision_model=settings.VISION_MODEL,
        )
    from agent.providers.local import LocalProvider

    mode = settings.LOCAL_LLM_MODE
    if mode == "auto":
        mode = "server" if os.environ.get("LOCAL_LLM_SHARED") == "1" else "inprocess"
    return LocalProvider(
        model_path=settings.LOCAL_MODEL_PATH,
        n_ctx=settings.LOCAL_N_CTX,
        n_threads=settings.LOCAL_THREADS,
        default_temperature=settings.LOCAL_TEMPERATURE,
        default_max_tokens=settings.LOCAL_MAX_TOKENS,
        mode=mode,
        state_dir=str(settings.DATA_DIR / "local-llm"),
        model=settings.LOCAL_MODEL,
    )


def build_moderator(settings: Settings, provider: LLMProvider) -> Any:
    from agent.moderation import build_moderator as _build

    return _build(settings, provider)


def build_llm(settings: Settings, db: Database | None, prompts: Any) -> LLM:
    provider = build_llm_provider(settings)
    return LLM(
        provider,
        prompts=prompts,
        recorder=GenerationRecorder(db),
        max_retries=settings.LLM_MAX_RETRIES,
        retry_base_s=settings.LLM_RETRY_BASE_S,
        max_concurrency=settings.LLM_MAX_CONCURRENCY,
        moderator=build_moderator(settings, provider),
        db=db,
        global_concurrency=settings.LLM_GLOBAL_CONCURRENCY,
        slot_wait_s=settings.LLM_TIMEOUT_S,
    )


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
        start = time.perf_counter()
        try:
            result = self.inner.generate(request)
            if not result.png:
                raise ModelError(
                    "the image service returned an empty image",
                    provider=self.name,
                    kind="image",
                    retryable=True,
                )
        except ModelError as exc:
            self.recorder.record(
                kind="image",
                provider=self.name,
                prompt=prompt,
                params=params,
                error=exc.to_dict(),
                latency_ms=(time.perf_counter() - start) * 1000,
                **_ctx(ctx),
            )
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
        result.generation_id = self.recorder.record(
            kind="image",
            provider=result.provider,
            prompt=prompt,
            params=params,
            output={"image_id": result.image_id, "bytes": len(result.png), "seed": result.seed},
            latency_ms=result.latency_ms,
            instance=result.instance,
            extra={"wait_ms": result.wait_ms, "attempts": result.attempts},
            **_ctx(ctx),
        )
        return result

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        if not requests:
            return []
        with ThreadPoolExecutor(
            max_workers=min(self.max_workers, len(requests)), thread_name_prefix="img"
        ) as pool:
            futures = [pool.submit(self.generate, r) for r in requests]
            return [f.result() for f in futures]

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        return self.inner.segment(image, text_prompt)

    def health(self) -> dict[str, Any]:
        return self.inner.health()


def _ctx(ctx: dict[str, Any]) -> dict[str, Any]:
    return {k: ctx.get(k) for k in ("app", "user", "session", "job", "step", "template")}


def build_image_provider(
    settings: Settings, db: Database | None, store: StoreFn | None = None
) -> ImageProvider:
    inner: Any
    if settings.IMAGE_PROVIDER == "sdwebui":
        from agent.pool import SDPoolProvider

        inner = SDPoolProvider.from_settings(settings, db)
    elif settings.IMAGE_PROVIDER == "openai":
        from agent.openai_images import OpenAIImageProvider

        inner = OpenAIImageProvider.from_settings(settings)
    else:
        inner = PlaceholderImageProvider(max_side=settings.MAX_IMAGE_SIDE)
    return RecordingImageProvider(inner, GenerationRecorder(db), store)
