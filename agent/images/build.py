"""Build the configured image provider from Settings (IMAGE_PROVIDER), wrapped to store and record."""

from __future__ import annotations

from typing import Any

from pymongo.database import Database

from agent.images.openai_provider import OpenAIImageProvider
from agent.images.placeholder import PlaceholderImageProvider
from agent.images.recording import RecordingImageProvider, StoreFn
from agent.images.sdwebui.provider import SDPoolProvider
from agent.records import GenerationRecorder
from agent.types import ImageProvider
from config import Settings


def build_image_provider(
    settings: Settings, db: Database | None, store: StoreFn | None = None
) -> ImageProvider:
    inner: Any
    if settings.IMAGE_PROVIDER == "sdwebui":
        inner = SDPoolProvider.from_settings(settings, db)
    elif settings.IMAGE_PROVIDER == "openai":
        inner = OpenAIImageProvider.from_settings(settings)
    else:
        inner = PlaceholderImageProvider(max_side=settings.MAX_IMAGE_SIDE)
    return RecordingImageProvider(inner, GenerationRecorder(db), store)
