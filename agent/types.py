"""Shared types of the agent layer.

Apps and providers meet here, so every provider (azure, openai, local, sdwebui,
openai images, placeholder) speaks the same small vocabulary and the apps never
import a provider directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = dict[str, Any]
"""An OpenAI-style chat message: {"role": ..., "content": str | list[content parts]}.

Image parts use the OpenAI vision form: {"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}.
"""


class ModelError(Exception):
    """A model service failed for good (after retries). Apps map it to 502/503."""

    def __init__(
        self,
        message: str,
        *,
        provider: str = "",
        status: int | None = None,
        retryable: bool = False,
        kind: str = "model",
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.status = status
        self.retryable = retryable
        self.kind = kind  # "model" (LLM) or "image"

    def to_dict(self) -> dict[str, Any]:
        return {
            "message": self.message,
            "provider": self.provider,
            "status": self.status,
            "kind": self.kind,
        }


@dataclass
class ChatResult:
    """What one finished chat call produced, with what the record needs."""

    text: str
    provider: str
    model: str
    data: Any = None  # parsed + validated JSON when JSON output was asked for
    usage: dict[str, int] = field(default_factory=dict)  # prompt_tokens, completion_tokens, total_tokens
    latency_ms: float = 0.0
    first_token_ms: float | None = None
    attempts: int = 1
    notes: list[str] = field(default_factory=list)  # e.g. "image parts dropped: provider has no vision"
    generation_id: str | None = None  # id of the `generations` record, when recorded
    finish_reason: str | None = None  # "stop", "length" (cut at max_tokens), ... when the provider says


class LLMProvider(Protocol):
    """One chat backend. Implementations: azure, openai (any compatible URL), local (embedded)."""

    name: str
    model: str
    supports_vision: bool

    def complete(
        self,
        messages: list[Message],
        *,
        params: dict[str, Any],
        json_schema: dict[str, Any] | None = None,
    ) -> ChatResult:
        """One blocking completion. With json_schema, constrain/ask for JSON matching it.

        Raises ModelError (retryable=True for 429/5xx/timeouts) on failure. The caller
        (agent.llm) does the retries, the validation and the record.
        """
        ...

    def stream(self, messages: list[Message], *, params: dict[str, Any]) -> Iterator[str]:
        """Yield text deltas (non-empty strings). Raises ModelError on failure."""
        ...

    def health(self) -> dict[str, Any]:
        """Cheap status for /health: {"ok": bool, "provider": ..., "model": ..., ...}."""
        ...


@dataclass
class ImageRequest:
    """One image to make. txt2img unless init_image is given (then img2img, inpaint with mask)."""

    prompt: str
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    sampler_name: str | None = None
    seed: int = -1
    checkpoint: str | None = None  # model affinity: prefer an instance that has it loaded
    init_image: bytes | None = None  # PNG/JPEG bytes
    mask: bytes | None = None  # PNG bytes, white = regenerate
    inpainting_mask_invert: bool = False
    denoising_strength: float = 0.75
    controlnet: list[dict[str, Any]] = field(default_factory=list)  # WebUI ControlNet units, passed through
    extra: dict[str, Any] = field(default_factory=dict)  # any other WebUI payload keys, passed through
    label: str = ""  # short human label (e.g. "page 3"), shown on placeholder images
    context: dict[str, Any] = field(
        default_factory=dict
    )  # app, user, session, job, step: stored with the record


@dataclass
class ImageResult:
    png: bytes
    provider: str
    instance: str | None = None
    seed: int | None = None
    latency_ms: float = 0.0
    wait_ms: float = 0.0  # time spent waiting for a free instance
    attempts: int = 1
    info: dict[str, Any] = field(default_factory=dict)
    image_id: str | None = None  # set when the image was stored (GridFS) by the recording wrapper
    generation_id: str | None = None


@dataclass
class Segmentation:
    """Result of cutting the main object out of an image (SAM or the placeholder's threshold)."""

    mask: bytes  # PNG, white = object
    cutout: bytes  # PNG, object on white background
    provider: str


class ImageProvider(Protocol):
    name: str

    def generate(self, request: ImageRequest) -> ImageResult:
        """Make one image; never returns empty bytes (raises ModelError(kind="image") instead)."""
        ...

    def generate_many(self, requests: list[ImageRequest]) -> list[ImageResult]:
        """Submit all at once (concurrently); results in request order; raises on any failure."""
        ...

    def segment(self, image: bytes, text_prompt: str) -> Segmentation: ...

    def health(self) -> dict[str, Any]: ...


@runtime_checkable
class ClaimsAhead(Protocol):
    """An image provider that can claim capacity for several images in one go (the SD pool's idle instances),
    then run each image on its claim. Wrappers (`RecordingImageProvider`) use it so a request's images start
    together; a claim is used by exactly one `generate_claimed`, which frees it if it cannot start."""

    def claim_many(self, requests: list[ImageRequest]) -> list[Any]:
        """One entry per request: its claim, or None (that image is generated the ordinary way)."""
        ...

    def generate_claimed(self, request: ImageRequest, claim: Any) -> ImageResult: ...
