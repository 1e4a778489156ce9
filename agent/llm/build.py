"""Build the configured chat provider, moderator and LLM from Settings; the only place that knows them all."""

from __future__ import annotations

import os
from typing import Any

from pymongo.database import Database

from agent.llm.client import LLM
from agent.llm.moderation import build_moderator
from agent.llm.providers.local import LocalProvider
from agent.llm.providers.openai_compat import OpenAICompatProvider
from agent.records import GenerationRecorder
from agent.types import LLMProvider
from config import Settings


def build_llm_provider(settings: Settings) -> LLMProvider:
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


__all__ = ["build_llm", "build_llm_provider", "build_moderator"]
