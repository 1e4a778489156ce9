"""Chat through the official `openai` SDK: OpenAI, any compatible server, or Azure OpenAI.

The SDK's own retries are switched off (max_retries=0): agent.llm retries with
backoff itself so every attempt is counted and recorded the same way for every
provider. This module only turns one call into a ChatResult / a stream of deltas
and every failure into a ModelError that says whether a retry can help (429, 5xx,
timeouts, dropped connections) and how long the server asked us to wait.
"""

from __future__ import annotations

import email.utils
import json
import logging
import math
import time
from collections.abc import Iterator
from typing import Any

import openai

from agent.types import ChatResult, Message, ModelError

log = logging.getLogger(__name__)

# Request keys passed through from template/call params; others (top_k, min_p, ...) are left out
# because OpenAI and Azure reject unknown arguments with HTTP 400.
_PARAM_KEYS = (
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "seed",
    "stop",
    "presence_penalty",
    "frequency_penalty",
)
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "total_tokens")
TRUNCATED_NOTE = "output truncated: the max_tokens limit was reached"
HEALTH_TIMEOUT_S = 3.0  # /health's probe of the model server: short, it answers within a few seconds


def parse_retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (`retry-after-ms`, `retry-after` seconds or HTTP date)."""
    if headers is None:
        return None
    for header, divisor in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = headers.get(header)
        if value is None:
            continue
        try:
            delay = float(value) / divisor
        except ValueError:
            parsed = email.utils.parsedate_tz(value) if header == "retry-after" else None
            if parsed is None:
                continue
            delay = email.utils.mktime_tz(parsed) - time.time()
        if math.isfinite(delay):
            return max(0.0, delay)
    return None


def _message(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("message"):
            return str(body["message"])
    if isinstance(body, str) and body.strip():
        text = " ".join(body.split())
        return text[:200] + ("..." if len(text) > 200 else "")
    return str(exc.message)


def to_model_error(exc: BaseException, provider: str, timeout: float | None = None) -> ModelError:
    """Any SDK/transport failure -> ModelError; `retry_after` (seconds) is set when the server sent one."""
    if isinstance(exc, ModelError):
        return exc
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        retryable = status == 429 or status >= 500
        err = ModelError(
            f"{provider} answered HTTP {status}: {_message(exc)}",
            provider=provider,
            status=status,
            retryable=retryable,
        )
        err.retry_after = parse_retry_after(exc.response.headers)  # type: ignore[attr-defined]
        return err
    if isinstance(exc, openai.APITimeoutError):
        after = f" after {timeout:g} s" if timeout else ""
        return ModelError(f"{provider} timed out{after}", provider=provider, retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        cause = exc.__cause__ or exc.__context__
        detail = f" ({type(cause).__name__}: {cause})" if cause else ""
        return ModelError(
            f"cannot reach {provider} or the connection broke{detail}", provider=provider, retryable=True
        )
    if isinstance(exc, openai.APIError):  # e.g. an error event inside a stream
        return ModelError(f"{provider} reported an error: {_message(exc)}", provider=provider, retryable=True)
    return ModelError(f"{provider} call failed: {type(exc).__name__}: {exc}", provider=provider)


def probe_models(
    client: openai.OpenAI, provider: str, timeout_s: float = HEALTH_TIMEOUT_S, *, model: str | None = None
) -> dict[str, Any]:
    """`GET {base}/models` with the configured key, no retries: {"ok", "latency_ms", "error"?, ...}.

    Free on OpenAI and Azure (a chat would cost tokens) and served by Ollama, vLLM and llama.cpp, so
    a refused connection, a wrong base URL (404) or a rejected key (401) shows up before a request needs it.
    """
    start = time.perf_counter()
    try:
        page = client.with_options(timeout=timeout_s, max_retries=0).models.list()
    except Exception as exc:  # noqa: BLE001 - every failure is reported as text
        err = to_model_error(exc, provider, timeout_s)
        out: dict[str, Any] = {"ok": False, "error": err.message}
        if err.status == 404:
            root = (
                "the resource endpoint, https://<resource>.openai.azure.com"
                if provider == "azure"
                else ("the API root, usually ending in /v1")
            )
            out["error"] += f" (no models list at this base URL: is it {root}?)"
        return {**out, "latency_ms": round((time.perf_counter() - start) * 1000, 1)}
    out = {"ok": True, "latency_ms": round((time.perf_counter() - start) * 1000, 1)}
    ids = [getattr(m, "id", None) for m in (page.data or [])]
    if model is not None and ids:
        # informative only: llama.cpp and some proxies serve any name they are asked for
        out["model_listed"] = model in ids
    return out


def has_images(messages: list[Message]) -> bool:
    return any(
        isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )


def _usage(usage: Any) -> dict[str, int]:
    if usage is None:
        return {}
    raw = usage.model_dump() if hasattr(usage, "model_dump") else dict(usage)
    return {k: int(raw[k]) for k in USAGE_KEYS if isinstance(raw.get(k), int)}


class DeltaStream:
    """Text deltas of one streamed completion; `.usage` and `.finish_reason` once it has ended.

    Closing it (or dropping it) closes the HTTP response, so the server stops generating.
    """

    def __init__(self, provider: OpenAICompatProvider, kwargs: dict[str, Any]) -> None:
        self._provider = provider
        self._kwargs = kwargs
        self._sdk_stream: Any = None
        self._gen = self._run()
        self.usage: dict[str, int] = {}
        self.finish_reason: str | None = None
        self.model: str = kwargs["model"]

    def __iter__(self) -> DeltaStream:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()
        if self._sdk_stream is not None:
            self._sdk_stream.close()

    def _open(self) -> Any:
        provider = self._provider
        kwargs = dict(self._kwargs)
        if provider.stream_usage:
            kwargs["stream_options"] = {"include_usage": True}
        try:
            return provider.client.chat.completions.create(stream=True, **kwargs)
        except openai.BadRequestError as exc:
            if provider.stream_usage and "stream_options" in _message(exc):
                # an older compatible server that rejects stream_options: stream without usage from now on
                log.warning("%s rejects stream_options; streaming without token usage", provider.name)
                provider.stream_usage = False
                return provider.client.chat.completions.create(stream=True, **self._kwargs)
            raise

    def _run(self) -> Iterator[str]:
        name = self._provider.name
        try:
            self._sdk_stream = self._open()
            for chunk in self._sdk_stream:
                if getattr(chunk, "usage", None):
                    self.usage = _usage(chunk.usage)
                if getattr(chunk, "model", None):
                    self.model = chunk.model
                if not chunk.choices:
                    continue  # Azure's prompt-filter chunk, the usage chunk
                choice = chunk.choices[0]
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
                content = choice.delta.content if choice.delta else None
                if content:
                    yield content
        except Exception as exc:  # noqa: BLE001 - every failure becomes a ModelError with retryability
            raise to_model_error(exc, name, self._provider.timeout) from exc
        finally:
            if self._sdk_stream is not None:
                self._sdk_stream.close()
        if self.finish_reason is None:
            raise ModelError(
                f"{name}'s stream ended before the model finished (no finish_reason)",
                provider=name,
                retryable=True,
            )


class OpenAICompatProvider:
    """`openai` (OPENAI_BASE_URL / OPENAI_API_KEY) or `azure` (AzureOpenAI + deployment)."""

    supports_vision = True

    def __init__(
        self,
        *,
        name: str,
        client: openai.OpenAI,
        model: str,
        vision_model: str | None = None,
        json_mode: str = "json_schema",
        timeout: float | None = None,
        extra_keys: tuple[str, ...] = (),
        stream_usage: bool = True,
    ) -> None:
        """extra_keys: params the server takes beyond OpenAI's (llama.cpp's top_k, min_p, ...), sent in
        the request body through the SDK's `extra_body`."""
        self.name = name
        self.client = client
        self.model = model
        self.vision_model = vision_model or model
        self.json_mode = json_mode  # "json_schema" (OpenAI/Azure/vLLM/Ollama) or "json_object" (+ schema)
        self.timeout = timeout
        self.extra_keys = extra_keys
        self.stream_usage = stream_usage  # ask for token usage in streams (stream_options.include_usage)

    @classmethod
    def openai(
        cls,
        *,
        base_url: str | None,
        api_key: str | None,
        model: str,
        timeout: float,
        vision_model: str | None = None,
        json_mode: str = "json_schema",
    ) -> OpenAICompatProvider:
        client = openai.OpenAI(
            base_url=base_url, api_key=api_key or "not-needed", timeout=timeout, max_retries=0
        )
        return cls(
            name="openai",
            client=client,
            model=model,
            vision_model=vision_model,
            json_mode=json_mode,
            timeout=timeout,
        )

    @classmethod
    def azure(
        cls,
        *,
        endpoint: str,
        api_key: str | None,
        api_version: str,
        deployment: str,
        timeout: float,
        vision_deployment: str | None = None,
    ) -> OpenAICompatProvider:
        client = openai.AzureOpenAI(
            azure_endpoint=endpoint, api_key=api_key, api_version=api_version, timeout=timeout, max_retries=0
        )
        # Azure OpenAI has no /moderations endpoint (its content filters run on every chat call instead):
        # agent.llm.moderation uses OpenAI's when OPENAI_API_KEY is set, else the local keyword check
        return cls(
            name="azure", client=client, model=deployment, vision_model=vision_deployment, timeout=timeout
        )

    def _model_for(self, messages: list[Message]) -> str:
        return self.vision_model if has_images(messages) else self.model

    def _kwargs(self, messages: list[Message], params: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "model": params.get("model") or self._model_for(messages),
            "messages": messages,
        }
        for key in _PARAM_KEYS:
            if params.get(key) is not None:
                kwargs[key] = params[key]
        extra = {key: params[key] for key in self.extra_keys if params.get(key) is not None}
        if extra:
            kwargs["extra_body"] = extra
        return kwargs

    def _response_format(self, schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """(response_format, wrapped). OpenAI's json_schema needs an object at the top: wrap others."""
        if self.json_mode != "json_schema":
            return {"type": "json_object", "schema": schema}, False
        wrapped = schema.get("type") != "object"
        if wrapped:
            schema = {"type": "object", "properties": {"value": schema}, "required": ["value"]}
        return {
            "type": "json_schema",
            "json_schema": {"name": "output", "schema": schema, "strict": False},
        }, wrapped

    def complete(
        self, messages: list[Message], *, params: dict[str, Any], json_schema: dict[str, Any] | None = None
    ) -> ChatResult:
        result, finish_reason = self.complete_with_reason(messages, params=params, json_schema=json_schema)
        if finish_reason == "length":
            result.notes.append(TRUNCATED_NOTE)
        return result

    def complete_with_reason(
        self, messages: list[Message], *, params: dict[str, Any], json_schema: dict[str, Any] | None = None
    ) -> tuple[ChatResult, str | None]:
        """One completion and its finish_reason ("length": cut at max_tokens), notes left to the caller."""
        kwargs = self._kwargs(messages, params)
        wrapped = False
        if json_schema is not None:
            kwargs["response_format"], wrapped = self._response_format(json_schema)
        start = time.perf_counter()
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError with retryability
            raise to_model_error(exc, self.name, self.timeout) from exc
        latency = (time.perf_counter() - start) * 1000
        if not resp.choices:
            raise ModelError(f"{self.name} returned no choices", provider=self.name, retryable=True)
        choice = resp.choices[0]
        text = choice.message.content
        refusal = getattr(choice.message, "refusal", None)
        if text is None and refusal:
            raise ModelError(f"{self.name}'s model refused: {refusal}", provider=self.name)
        if choice.finish_reason == "content_filter":
            raise ModelError(
                f"{self.name}'s content filter blocked the reply", provider=self.name, status=400
            )
        result = ChatResult(
            text=text or "",
            provider=self.name,
            model=resp.model or kwargs["model"],
            usage=_usage(resp.usage),
            latency_ms=latency,
        )
        if wrapped:
            try:
                value = json.loads(result.text)
            except ValueError:
                value = None
            if isinstance(value, dict) and set(value) == {"value"}:
                result.data = value["value"]
        return result, choice.finish_reason

    def stream(self, messages: list[Message], *, params: dict[str, Any]) -> DeltaStream:
        return DeltaStream(self, self._kwargs(messages, params))

    def moderate(self, text: str) -> dict[str, Any]:
        try:
            resp = self.client.moderations.create(input=text)
        except Exception as exc:  # noqa: BLE001 - mapped to ModelError
            raise to_model_error(exc, self.name, self.timeout) from exc
        if not resp.results:
            raise ModelError(f"{self.name} moderation returned no result", provider=self.name, retryable=True)
        result = resp.results[0]
        categories = result.categories.model_dump(by_alias=True) if result.categories else {}
        scores = result.category_scores.model_dump(by_alias=True) if result.category_scores else {}
        flagged = sorted(k for k, v in categories.items() if v)
        return {
            "flagged": bool(result.flagged),
            "categories": flagged,
            "scores": {k: round(float(scores[k]), 4) for k in flagged if scores.get(k) is not None},
            "provider": f"{self.name}-moderation",
            "model": getattr(resp, "model", None),
        }

    def health(self) -> dict[str, Any]:
        """One cheap authenticated call (the models list): proves the server answers and takes the key."""
        timeout = min(HEALTH_TIMEOUT_S, self.timeout or HEALTH_TIMEOUT_S)
        return {
            "provider": self.name,
            "model": self.model,
            "base_url": str(self.client.base_url),
            **probe_models(self.client, self.name, timeout, model=self.model),
        }
