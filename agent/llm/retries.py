"""Retries of model calls (tenacity): which errors, how long to wait, and what the caller sees in the end.

Retryable: a ModelError that says so (429, 5xx, timeouts, broken connections), never a SlotTimeout (the
caller already waited). The wait is the server's Retry-After (capped), else exponential backoff with
jitter. Every attempt and retry is counted in a `Tracker` for the result and the generation record.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from agent.llm.slots import SlotTimeout
from agent.types import ModelError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Tracker:
    """What happened during one call's attempts, for the result and the record."""

    attempts: int = 0
    queue_ms: float = 0.0
    retries: list[dict[str, Any]] = field(default_factory=list)


def retryable(exc: BaseException) -> bool:
    return isinstance(exc, ModelError) and exc.retryable and not isinstance(exc, SlotTimeout)


def error_dict(exc: ModelError) -> dict[str, Any]:
    """The `error` field of a generation record."""
    return {**exc.to_dict(), "retryable": exc.retryable, "type": type(exc).__name__}


@contextmanager
def as_model_error(provider: str, what: str) -> Iterator[None]:
    """A provider bug (any exception but a ModelError) still ends as a recorded, non-retryable ModelError."""
    try:
        yield
    except ModelError:
        raise
    except Exception as exc:  # noqa: BLE001 - see the docstring
        log.exception("%s %s failed unexpectedly", provider, what)
        raise ModelError(f"{provider} {what} failed: {type(exc).__name__}: {exc}", provider=provider) from exc


@dataclass
class RetryPolicy:
    """How one LLM retries: attempts, backoff and the Retry-After cap."""

    provider: str
    max_retries: int = 3
    base_s: float = 0.5
    max_s: float = 8.0
    retry_after_cap_s: float = 30.0

    def delay_for(self, exc: BaseException, attempt: int) -> float:
        """Seconds to wait before the next attempt: the server's Retry-After (capped), else backoff + jitter."""
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            return min(max(0.0, float(retry_after)), self.retry_after_cap_s)
        delay = min(self.max_s, self.base_s * (2 ** (attempt - 1)))
        return delay / 2 + random.uniform(0, delay / 2)

    def note_retry(self, tracker: Tracker, exc: ModelError, wait_s: float) -> None:
        tracker.retries.append(
            {
                "attempt": tracker.attempts,
                "error": exc.message,
                "status": exc.status,
                "wait_s": round(wait_s, 3),
            }
        )
        log.warning(
            "%s attempt %d failed (%s); retrying in %.2f s",
            self.provider,
            tracker.attempts,
            exc.message,
            wait_s,
        )

    def retrying(self, tracker: Tracker, *, still_allowed: Callable[[], bool] = lambda: True) -> Retrying:
        """A tenacity Retrying for one call; `still_allowed()` False stops retries (a stream that has
        already shown text). Each attempt must add itself to `tracker.attempts`."""

        def wait(state: RetryCallState) -> float:
            exc = state.outcome.exception() if state.outcome else None
            return self.delay_for(exc, state.attempt_number) if exc else 0.0

        def before_sleep(state: RetryCallState) -> None:
            exc = state.outcome.exception() if state.outcome else None
            if isinstance(exc, ModelError):
                self.note_retry(tracker, exc, state.upcoming_sleep)

        return Retrying(
            stop=stop_after_attempt(self.max_retries + 1),
            wait=wait,
            retry=retry_if_exception(lambda exc: retryable(exc) and still_allowed()),
            before_sleep=before_sleep,
            reraise=True,
        )

    def run(self, fn: Callable[[], T], tracker: Tracker) -> T:
        """fn() with retries on retryable ModelErrors; counts attempts; raises the last error."""

        def attempt() -> T:
            tracker.attempts += 1
            with as_model_error(self.provider, "call"):
                return fn()

        return self.retrying(tracker)(attempt)

    def final_message(self, exc: ModelError, attempts: int) -> str:
        if attempts > 1:
            if exc.retryable:
                return f"{exc.message} (gave up after {attempts} attempts)"
            return f"{exc.message} ({attempts} attempts)"
        if isinstance(exc, SlotTimeout):
            return exc.message
        if not exc.retryable:
            return f"{exc.message} (1 attempt; not retried: a retry would not help)"
        return f"{exc.message} (1 attempt; retries are off)"

    def final(self, exc: ModelError, attempts: int) -> ModelError:
        """The error the app sees: the last attempt's, with the attempt count in its message."""
        cls = SlotTimeout if isinstance(exc, SlotTimeout) else ModelError
        err = cls(
            self.final_message(exc, attempts),
            provider=exc.provider or self.provider,
            status=exc.status,
            retryable=exc.retryable,
            kind=exc.kind,
        )
        err.attempts = attempts  # type: ignore[attr-defined]
        return err
