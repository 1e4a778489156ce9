"""Chat through the official `openai` SDK: OpenAI, any compatible server, or Azure OpenAI.

The SDK's own retries are switched off (max_retries=0): agent.llm retries with
backoff itself so every attempt is counted and recorded the same way for every
provider.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import openai

from agent.types import ChatResult, Message, ModelError

_PARAM_KEYS = ("temperature", "max_tokens", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty")


def _error(exc: Exception, provider: str) -> ModelError:
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status == 429 or status >= 500
        return ModelError(f"{provider} answered HTTP {status}: {_message(exc)}", provider=provider,
                          status=status, retryable=retryable)
    if isinstance(exc, openai.APITimeoutError):
        return ModelError(f"{provider} timed out", provider=provider, retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ModelError(f"cannot reach {provider}: {exc}", provider=provider, retryable=True)
    return ModelError(f"{provider} call failed: {type(exc).__name__}: {exc}", provider=provider)


def _message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
    return str(exc.message)


class OpenAICompatProvider:
    """`openai` (OPENAI_BASE_URL / OPENAI_API_KEY) or `azure` (AzureOpenAI + deployment)."""

    supports_vision = True

    def __init__(self, *, name: str, client: openai.OpenAI, model: str, vision_model: str | None = None,
                 json_mode: str = "json_schema") -> None:
        self.name = name
        self.client = client
        self.model = model
        self.vision_model = vision_model or model
        self.json_mode = json_mode  # "json_schema" (OpenAI/Azure) or "json_object"

    @classmethod
    def openai(cls, *, base_url: str | None, api_key: str | None, model: str, timeout: float,
               vision_model: str | None = None) -> OpenAICompatProvider:
        client = openai.OpenAI(base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0)
        return cls(name="openai", client=client, model=model, vision_model=vision_model)

    @classmethod
    def azure(cls, *, endpoint: str, api_key: str | None, api_version: str, deployment: str, timeout: float,
              vision_deployment: str | None = None) -> OpenAICompatProvider:
        client = openai.AzureOpenAI(azure_endpoint=endpoint, api_key=api_key, api_version=api_version,
                                    timeout=timeout, max_retries=0)
        return cls(name="azure", client=client, model=deployment, vision_model=vision_deployment)

    def _model_for(self, messages: list[Message]) -> str:
        has_image = any(isinstance(m.get("content"), list) and any(p.get("type") == "image_url" for p in m["content"])
                        for m in messages)
        return self.vision_model if has_image else self.model

    def _kwargs(self, messages: list[Message], params: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"model": params.get("model") or self._model_for(messages), "messages": messages}
        for key in _PARAM_KEYS:
            if params.get(key) is not None:
                kwargs[key] = params[key]
        return kwargs

    def complete(self, messages: list[Message], *, params: dict[str, Any],
                 json_schema: dict[str, Any] | None = None) -> ChatResult:
        kwargs = self._kwargs(messages, params)
        if json_schema is not None:
            if self.json_mode == "json_schema":
                kwargs["response_format"] = {"type": "json_schema",
                                             "json_schema": {"name": "output", "schema": json_schema, "strict": False}}
            else:
                kwargs["response_format"] = {"type": "json_object", "schema": json_schema}
        start = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError with retryability
            raise _error(exc, self.name) from exc
        latency = (time.perf_counter() - start) * 1000
        if not resp.choices:
            raise ModelError(f"{self.name} returned no choices", provider=self.name, retryable=True)
        text = resp.choices[0].message.content or ""
        usage = resp.usage.model_dump() if resp.usage else {}
        usage = {k: usage[k] for k in ("prompt_tokens", "completion_tokens", "total_tokens") if k in usage}
        return ChatResult(text=text, provider=self.name, model=kwargs["model"], usage=usage, latency_ms=latency)

    def stream(self, messages: list[Message], *, params: dict[str, Any]) -> Iterator[str]:
        kwargs = self._kwargs(messages, params)
        try:
            stream = self.client.chat.completions.create(stream=True, **kwargs)
            for chunk in stream:
                if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                    yield chunk.choices[0].delta.content
        except ModelError:
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError
            raise _error(exc, self.name) from exc

    def moderate(self, text: str) -> dict[str, Any]:
        try:
            resp = self.client.moderations.create(input=text)
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError
            raise _error(exc, self.name) from exc
        result = resp.results[0]
        categories = result.categories.model_dump() if result.categories else {}
        return {"flagged": bool(result.flagged), "categories": sorted(k for k, v in categories.items() if v),
                "provider": f"{self.name}-moderation"}

    def health(self) -> dict[str, Any]:
        return {"ok": True, "provider": self.name, "model": self.model, "base_url": str(self.client.base_url)}
