"""The image steps shared by the stimulus pipelines and image refinement.

Both build `ImageRequest`s from the designers' SD settings (`settings/refinement/sd_options.yaml`,
one block per kind of image) and hand them to the image provider in one `generate_many`; both
treat an unusable or empty image as a model failure (502), never as a success.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from agent.prompts import PromptLibrary
from agent.types import ImageRequest, ImageResult, ModelError
from apps.core.context import Services
from apps.core.errors import ApiError

SD_OPTIONS_FILE = "refinement/sd_options.yaml"
SD_KINDS = ("scene", "product", "img2img", "inpaint")
SD_KEYS = {
    "width",
    "height",
    "steps",
    "cfg_scale",
    "sampler_name",
    "checkpoint",
    "denoising_strength",
    "extra",
}
SD_DEFAULTS: dict[str, Any] = {
    "width": 1024,
    "height": 576,
    "steps": 30,
    "cfg_scale": 5.0,
    "sampler_name": "DPM++ 2M SDE Karras",
    "checkpoint": None,
    "extra": {},
}


def parse_sd_options(path: Path, data: bytes) -> dict[str, dict[str, Any]]:
    """The YAML table `kind: {key: value}`; a bad file is a settings error naming the allowed kinds/keys."""
    try:
        raw = yaml.safe_load(data.decode("utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ApiError(500, f"{path}: not valid YAML ({exc})", code="settings_error") from exc
    if not isinstance(raw, dict):
        raise ApiError(500, f"{path}: expected 'kind: {{key: value}}' mappings", code="settings_error")
    table: dict[str, dict[str, Any]] = {}
    for kind, values in raw.items():
        if kind not in SD_KINDS or not isinstance(values, dict) or set(values) - SD_KEYS:
            raise ApiError(
                500,
                f"{path}: bad entry {kind!r} (kinds: {', '.join(SD_KINDS)}; keys: "
                f"{', '.join(sorted(SD_KEYS))})",
                code="settings_error",
            )
        table[kind] = values
    return table


def sd_options(prompts: PromptLibrary, kind: str) -> dict[str, Any]:
    """The SD settings of one image kind (re-read by the prompt library when the YAML file changes)."""
    table = prompts.data_file(SD_OPTIONS_FILE, parse_sd_options) or {}
    return {**SD_DEFAULTS, "denoising_strength": 0.75 if kind == "inpaint" else 0.6, **table.get(kind, {})}


def image_request(opts: dict[str, Any], **fields: Any) -> ImageRequest:
    """An ImageRequest with the kind's sampler settings; `fields` (prompt, size, init image, ...) win."""
    return ImageRequest(
        steps=int(opts["steps"]),
        cfg_scale=float(opts["cfg_scale"]),
        sampler_name=opts.get("sampler_name"),
        checkpoint=opts.get("checkpoint"),
        extra=dict(opts.get("extra") or {}),
        **fields,
    )


def generate_images(svc: Services, requests: list[ImageRequest]) -> list[ImageResult]:
    """All requests in one `generate_many`; results in order, each a stored, non-empty image."""
    try:
        results: list[ImageResult] = svc.image_provider.generate_many(requests)
    except ApiError as exc:  # the store refused what the image service returned
        raise ModelError(
            f"the image service returned an unusable image: {exc.message}",
            provider="images",
            status=502,
            kind="image",
        ) from exc
    for res in results:
        if not res.png or not res.image_id:
            raise ModelError(
                "the image service returned an empty image", provider=res.provider, status=502, kind="image"
            )
    return results
