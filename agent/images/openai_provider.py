"""Images through the OpenAI images API (DALL·E 2/3, gpt-image-*), on OpenAI, a compatible server or Azure.

The apps ask for SD-style requests (any width x height, a negative prompt, img2img with
a white-is-regenerate mask). This provider maps them honestly onto what the images API
can do: the size becomes the model's supported size closest in aspect ratio and the
result is resized to what was asked (the record keeps the native size), the negative
prompt is appended as an "Avoid:" sentence, an init image goes to `images.edit` with
the mask converted to OpenAI's transparent-is-edit convention, and ControlNet units are
dropped with a note in `info` (the API has nothing like them).
"""

from __future__ import annotations

import base64
import binascii
import io
import time
from typing import Any
from urllib.parse import urlparse

import httpx
import openai
from PIL import Image, ImageOps

from agent.images.concurrent import generate_concurrently
from agent.images.placeholder import PlaceholderImageProvider
from agent.images.png import png_bytes, to_png
from agent.types import ImageRequest, ImageResult, ModelError, Segmentation

# sizes each model family accepts (OpenAI API reference, images.generate `size`)
SIZES: dict[str, list[tuple[int, int]]] = {
    "dall-e-2": [(256, 256), (512, 512), (1024, 1024)],
    "dall-e-3": [(1024, 1024), (1792, 1024), (1024, 1792)],
    "gpt-image": [(1024, 1024), (1536, 1024), (1024, 1536)],
}
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


def model_family(model: str) -> str:
    name = model.lower()
    if "dall-e-2" in name or "dalle2" in name:
        return "dall-e-2"
    if "dall-e-3" in name or "dalle3" in name:
        return "dall-e-3"
    return "gpt-image"  # gpt-image-1 and later, and the default for unknown names


def supported_size(model: str, width: int, height: int) -> tuple[int, int]:
    """The model's size closest in aspect ratio to width x height (then closest in area)."""
    want = width / max(1, height)
    return min(
        SIZES[model_family(model)], key=lambda s: (abs(s[0] / s[1] - want), abs(s[0] * s[1] - width * height))
    )


def _error(exc: Exception, provider: str) -> ModelError:
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        body = exc.body if isinstance(exc.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        detail = err.get("message") if isinstance(err, dict) else None
        return ModelError(
            f"{provider} images answered HTTP {status}: {detail or exc.message}",
            provider=provider,
            status=status,
            retryable=status == 429 or status >= 500,
            kind="image",
        )
    if isinstance(exc, openai.APITimeoutError):
        return ModelError(f"{provider} images timed out", provider=provider, retryable=True, kind="image")
    if isinstance(exc, openai.APIConnectionError):
        return ModelError(
            f"cannot reach {provider} images: {exc}", provider=provider, retryable=True, kind="image"
        )
    return ModelError(
        f"{provider} images call failed: {type(exc).__name__}: {exc}", provider=provider, kind="image"
    )


def _mask_to_alpha(mask: bytes, size: tuple[int, int], invert: bool) -> bytes:
    """SD masks: white = regenerate. OpenAI edit masks: transparent = regenerate."""
    with Image.open(io.BytesIO(mask)) as img:
        gray = ImageOps.fit(img.convert("L"), size)
    regenerate = ImageOps.invert(gray) if invert else gray
    rgba = Image.new("RGBA", size, (0, 0, 0, 255))
    rgba.putalpha(ImageOps.invert(regenerate))
    return png_bytes(rgba)


class OpenAIImageProvider:
    """ImageProvider over `client.images` of the openai SDK (openai.OpenAI or openai.AzureOpenAI)."""

    def __init__(
        self,
        client: openai.OpenAI,
        model: str,
        *,
        name: str = "openai",
        response_format: str | None = None,
        download_timeout_s: float = 30.0,
        max_side: int = 4096,
    ) -> None:
        self.client = client
        self.model = model
        self.name = name
        # None = automatic: ask for b64_json where the model takes the parameter (DALL·E);
        # gpt-image models always answer b64_json and reject the parameter.
        self.response_format = response_format
        self.download_timeout_s = download_timeout_s
        self._fallback = PlaceholderImageProvider(max_side=max_side)

    @classmethod
    def from_settings(cls, settings: Any) -> OpenAIImageProvider:
        """Azure when LLM_PROVIDER=azure (OPENAI_IMAGE_MODEL is then the image deployment), else OpenAI."""
        timeout = max(60.0, float(settings.LLM_TIMEOUT_S))
        if settings.LLM_PROVIDER == "azure" and settings.AZURE_OPENAI_ENDPOINT:
            client: openai.OpenAI = openai.AzureOpenAI(
                azure_endpoint=settings.AZURE_OPENAI_ENDPOINT,
                api_key=settings.AZURE_OPENAI_API_KEY,
                api_version=settings.AZURE_OPENAI_API_VERSION,
                timeout=timeout,
                max_retries=2,
            )
            name = "azure"
        else:
            client = openai.OpenAI(
                base_url=settings.OPENAI_BASE_URL,
                api_key=settings.OPENAI_API_KEY or "not-needed",
                timeout=timeout,
                max_retries=2,
            )
            name = "openai"
        return cls(client, settings.OPENAI_IMAGE_MODEL, name=name, max_side=settings.MAX_IMAGE_SIDE)

    def _response_format(self) -> str | None:
        if self.response_format:
            return self.response_format
        return "b64_json" if model_family(self.model).startswith("dall-e") else None

    def _prompt(self, req: ImageRequest) -> str:
        prompt = req.prompt
        if req.negative_prompt.strip():
            prompt = f"{prompt}\n\nAvoid: {req.negative_prompt.strip()}"
        return prompt

    def generate(self, request: ImageRequest) -> ImageResult:
        start = time.perf_counter()
        size = supported_size(self.model, request.width, request.height)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "prompt": self._prompt(request),
            "n": 1,
            "size": f"{size[0]}x{size[1]}",
        }
        fmt = self._response_format()
        if fmt:
            kwargs["response_format"] = fmt
        notes = []
        if request.controlnet:
            notes.append("controlnet units ignored: the images API has no equivalent")
        if request.checkpoint:
            notes.append(f"checkpoint {request.checkpoint!r} ignored: using {self.model}")
        try:
            if request.init_image is not None:
                with Image.open(io.BytesIO(request.init_image)) as src:
                    init = png_bytes(ImageOps.fit(src.convert("RGBA"), size))
                edit: dict[str, Any] = dict(kwargs)
                edit["image"] = ("image.png", init, "image/png")
                if request.mask is not None:
                    edit["mask"] = (
                        "mask.png",
                        _mask_to_alpha(request.mask, size, request.inpainting_mask_invert),
                        "image/png",
                    )
                resp = self.client.images.edit(**edit)
            else:
                resp = self.client.images.generate(**kwargs)
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError(kind="image")
            raise _error(exc, self.name) from exc
        data = list(getattr(resp, "data", None) or [])
        if not data:
            raise ModelError(
                f"{self.name} images returned no image", provider=self.name, retryable=True, kind="image"
            )
        raw = self._bytes(data[0])
        try:
            png = to_png(raw)
        except ValueError as exc:
            raise ModelError(
                f"{self.name} images returned an undecodable image: {exc}",
                provider=self.name,
                retryable=True,
                kind="image",
            ) from exc
        if size != (request.width, request.height):
            with Image.open(io.BytesIO(png)) as img:
                png = png_bytes(img.convert("RGB").resize((request.width, request.height), Image.LANCZOS))
        revised = getattr(data[0], "revised_prompt", None)
        return ImageResult(
            png=png,
            provider=self.name,
            instance=self.model,
            seed=None,
            latency_ms=(time.perf_counter() - start) * 1000,
            info={
                "model": self.model,
                "native_size": f"{size[0]}x{size[1]}",
                "revised_prompt": revised,
                "notes": notes,
            },
        )

    def _bytes(self, item: Any) -> bytes:
        b64 = getattr(item, "b64_json", None)
        if b64:
            try:
                raw = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise ModelError(
                    f"{self.name} images returned invalid base64: {exc}",
                    provider=self.name,
                    retryable=True,
                    kind="image",
                ) from exc
            if raw:
                return raw
        url = getattr(item, "url", None)
        if not url:
            raise ModelError(
                f"{self.name} images returned an empty image",
                provider=self.name,
                retryable=True,
                kind="image",
            )
        host = urlparse(url).hostname or ""
        if host not in LOCAL_HOSTS:
            # we ask for b64_json; a remote URL would be a second, unaccounted download from a third party
            raise ModelError(
                f"{self.name} images answered with a URL on {host!r} instead of b64_json; "
                "only local URLs are fetched",
                provider=self.name,
                kind="image",
            )
        try:
            resp = httpx.get(url, timeout=self.download_timeout_s)
            resp.raise_for_status()
        except httpx.HTTPError as exc:
            raise ModelError(
                f"could not download the generated image from {url}: {exc}",
                provider=self.name,
                retryable=True,
                kind="image",
            ) from exc
        if not resp.content:
            raise ModelError(
                f"{self.name} images: the image at {url} is empty",
                provider=self.name,
                retryable=True,
                kind="image",
            )
        return resp.content

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        return generate_concurrently(self, requests)

    def segment(self, image: bytes, text_prompt: str) -> Segmentation:
        """The images API cannot segment; the placeholder's threshold cut-out is used and says so."""
        seg = self._fallback.segment(image, text_prompt)
        seg.provider = f"placeholder-threshold ({self.name} images cannot segment)"
        return seg

    def health(self) -> dict[str, Any]:
        return {
            "ok": True,
            "provider": self.name,
            "model": self.model,
            "note": "not probed (each call costs money)",
        }
