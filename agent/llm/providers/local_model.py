"""The in-process llama.cpp model (llama-cpp-python): one loaded copy per process, calls serialised.

One llama.cpp context is not thread-safe, so each loaded model carries a lock; a copy inherited
through fork is never used (llama.cpp state is not fork-safe): the child loads its own.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from agent.llm.providers.model_files import CHAT_FORMATS, PROVIDER
from agent.types import ModelError

log = logging.getLogger(__name__)


class Speed:
    """Rolling tokens/s over the last few generations (decode speed: tokens after the first)."""

    def __init__(self, window: int = 20) -> None:
        self._samples: deque[tuple[int, float]] = deque(maxlen=window)
        self._lock = threading.Lock()

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        with self._lock:
            self._samples.append((tokens, seconds))

    def rolling(self) -> float | None:
        with self._lock:
            seconds = sum(s for _, s in self._samples)
            return sum(t for t, _ in self._samples) / seconds if seconds > 0 else None


def decode_rate(speed: Speed, tokens: int, start: float, first: float | None, end: float) -> None:
    """Record tokens/s, excluding prompt processing when the first-token time is known."""
    if first is not None and tokens > 1 and end > first:
        speed.add(tokens - 1, end - first)
    else:
        speed.add(tokens, end - start)


@dataclass
class Loaded:
    llama: Any
    lock: threading.Lock
    load_s: float
    pid: int = field(default_factory=os.getpid)
    speed: Speed = field(default_factory=Speed)


_MODELS: dict[tuple[str, int, int], Loaded] = {}
_MODELS_LOCK = threading.Lock()


def _close_models() -> None:
    """Free the loaded models while the interpreter is whole: llama-cpp's own __del__ runs too late at
    exit (its library handles are already gone) and prints a TypeError traceback."""
    with _MODELS_LOCK:
        for entry in _MODELS.values():
            if entry.pid == os.getpid():
                entry.llama.close()
        _MODELS.clear()


atexit.register(_close_models)


def loaded(key: tuple[str, int, int]) -> Loaded | None:
    """This process's model for (path, n_ctx, threads) if it is loaded (not one inherited through fork)."""
    entry = _MODELS.get(key)
    return entry if entry is not None and entry.pid == os.getpid() else None


def thread_count(n_threads: int | None) -> int:
    return n_threads if n_threads and n_threads > 0 else max(1, os.cpu_count() or 1)


def load(path: Path, n_ctx: int, threads: int) -> Loaded:
    """The process-wide model for (path, n_ctx, threads), loading it on first use."""
    key = (str(path), n_ctx, threads)
    with _MODELS_LOCK:
        entry = _MODELS.get(key)
        # a copy inherited through fork (e.g. gunicorn --preload) is not used: llama.cpp state is not fork-safe
        if entry is not None and entry.pid == os.getpid():
            return entry
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise ModelError(
                f"the local LLM needs llama-cpp-python: `pip install 'llama-cpp-python>=0.3.36,<0.4'` "
                f"({exc})",
                provider=PROVIDER,
            ) from exc
        start = time.perf_counter()
        try:
            llama = Llama(
                model_path=str(path),
                n_ctx=n_ctx,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                chat_format=CHAT_FORMATS.get(path.name),  # None: the GGUF's own chat template
            )
        except Exception as exc:  # noqa: BLE001 - llama raises ValueError/RuntimeError for bad files
            raise ModelError(
                f"cannot load local LLM model {path}: {type(exc).__name__}: {exc}", provider=PROVIDER
            ) from exc
        entry = Loaded(llama=llama, lock=threading.Lock(), load_s=time.perf_counter() - start)
        _MODELS[key] = entry
        log.info(
            "local LLM loaded %s in %.2f s (n_ctx=%d, threads=%d)", path.name, entry.load_s, n_ctx, threads
        )
        return entry


def generate(
    entry: Loaded, chat: list[dict[str, str]], kwargs: dict[str, Any], stats: dict[str, Any]
) -> Iterator[str]:
    """Stream deltas from llama.cpp (caller holds the lock), filling `stats` as it goes.

    Streaming is used for blocking calls too: it gives the first-token time for free, and the
    usage follows from the context's token count (see below).
    """
    llama = entry.llama
    start = time.perf_counter()
    chunks = 0
    kwargs = dict(kwargs)
    min_tokens = kwargs.pop("min_tokens", None)
    if min_tokens:
        kwargs["logits_processor"] = no_end_before(int(llama.token_eos()), int(min_tokens))
    try:
        inner = llama.create_chat_completion(messages=chat, stream=True, **kwargs)
    except Exception as exc:  # noqa: BLE001
        raise llama_error(exc) from exc
    try:
        for chunk in inner:
            choice = chunk["choices"][0]
            if choice.get("finish_reason"):
                stats["finish_reason"] = choice["finish_reason"]
            delta = choice.get("delta", {}).get("content")
            if not delta:
                continue
            if stats.get("first") is None:
                stats["first"] = time.perf_counter()
                # the first token is sampled but not yet evaluated: the context holds the prompt
                stats["prompt_tokens"] = int(llama.n_tokens)
            chunks += 1
            yield delta
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise llama_error(exc) from exc
    finally:
        close = getattr(inner, "close", None)
        if close is not None:
            close()
        end = time.perf_counter()
        prompt = int(stats.get("prompt_tokens") or 0)
        completion = max(chunks, int(llama.n_tokens) - prompt) if prompt else chunks
        stats.update(start=start, end=end, completion_tokens=completion)
        if prompt:
            stats["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        first = stats.get("first")
        decode_rate(entry.speed, completion, start, first, end)


def no_end_before(eos: int, min_tokens: int) -> Any:
    """A llama.cpp logits processor that forbids the end token for the first `min_tokens` tokens.

    A 135M model ends a "story of about 100 words" after 20-40 words; with this it writes on until the
    caller (storyteller's sentence gate) stops it at the sentence end near the asked length.
    """
    from llama_cpp import LogitsProcessorList

    start: list[int] = []

    def process(input_ids: Any, scores: Any) -> Any:
        if not start:
            start.append(len(input_ids))
        if len(input_ids) - start[0] < min_tokens:
            scores[eos] = -float("inf")
        return scores

    return LogitsProcessorList([process])


def llama_error(exc: Exception) -> ModelError:
    text = str(exc)
    if "exceed context window" in text:
        return ModelError(
            f"the prompt is too long for the local model: {text} (raise LOCAL_N_CTX)",
            provider=PROVIDER,
            status=400,
        )
    return ModelError(f"local model failed: {type(exc).__name__}: {text}", provider=PROVIDER, retryable=True)
