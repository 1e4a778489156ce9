"""Running one WebUI call on a leased instance, retried on another instance when it fails.

A failed generation is retried elsewhere (up to `max_attempts`), avoiding the instances that
already failed it unless every up instance has; a timed-out one is interrupted on its
instance (it may still be running on the GPU; with depth 2 whatever ran ahead of ours was
granted earlier with no longer a timeout, so its caller has timed out already). The pool's
`run` is this over its leases; `client_for(lease)` gives a caller queued behind a running
image (`Lease.queued`) the doubled read timeout.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from pymongo.errors import PyMongoError

from agent.images.sdwebui.client import PROVIDER, SDClient, SDError
from agent.images.sdwebui.queue import Lease
from agent.types import ModelError

T = TypeVar("T")


@dataclass
class RunInfo:
    instance: str
    attempts: int
    wait_ms: float
    latency_ms: float
    errors: list[str] = field(default_factory=list)


class Leasing(Protocol):
    """What `run` needs of the pool."""

    clients: dict[str, SDClient]
    max_attempts: int
    ping_timeout_s: float

    def acquire(self, checkpoint: str | None = None, exclude: list[str] = ...) -> Lease: ...

    def release(
        self, lease: Lease, *, ok: bool = True, error: SDError | None = None, checkpoint: str | None = None
    ) -> None: ...

    def up_instances(self) -> set[str]: ...

    def client_for(self, lease: Lease) -> SDClient: ...

    def hold_back(self, lease: Lease, exclude: list[str], checkpoint: str | None) -> Lease: ...

    def stopping_error(self) -> ModelError | None: ...


def run(
    pool: Leasing,
    call: Callable[[SDClient], tuple[T, str | None]],
    *,
    checkpoint: str | None = None,
    what: str = "image generation",
    lease: Lease | None = None,
) -> tuple[T, RunInfo]:
    """Run `call(client)` on a leased instance, retrying on another instance when it fails.

    `call` returns (value, checkpoint now loaded or None) and raises SDError on failure. `lease`:
    one already held for this call (the first attempt runs on it).
    """
    start = time.monotonic()
    exclude: list[str] = []
    errors: list[str] = []
    wait_ms = 0.0
    attempts = 0
    given: Lease | None = lease
    while attempts < pool.max_attempts:
        if given is not None:
            held, given = given, None
        else:
            held = _acquire(pool, checkpoint, exclude, errors, attempts)
        held = pool.hold_back(held, exclude, checkpoint)  # queued behind a running image: send near its end
        stopping = pool.stopping_error()
        if stopping is not None:  # handed to us (or held back) after shutdown began: free it, start nothing
            pool.release(held, ok=False)
            raise stopping
        attempts += 1
        wait_ms += held.wait_ms
        try:
            value, loaded = call(pool.client_for(held))
        except SDError as exc:
            pool.release(held, ok=False, error=exc)
            if exc.failure == "timeout":
                _interrupt_later(pool.clients[held.url], pool.ping_timeout_s)
            errors.append(f"{held.url}: {exc.message}")
            if not exc.retryable:
                raise
            if held.url not in exclude:
                exclude.append(held.url)
            continue
        except BaseException:
            pool.release(held, ok=False)
            raise
        pool.release(held, ok=True, checkpoint=loaded or checkpoint)
        return value, RunInfo(
            instance=held.url,
            attempts=attempts,
            wait_ms=wait_ms,
            latency_ms=(time.monotonic() - start) * 1000,
            errors=errors,
        )
    raise ModelError(
        f"{what} failed on {attempts} attempts: " + "; ".join(errors),
        provider=PROVIDER,
        status=502,
        retryable=True,
        kind="image",
    )


def _acquire(
    pool: Leasing, checkpoint: str | None, exclude: list[str], errors: list[str], attempts: int
) -> Lease:
    """The next attempt's lease, avoiding the instances that failed this call (unless every up one did)."""
    avoid = exclude
    if exclude:
        try:
            if not pool.up_instances() - set(exclude):
                avoid = []  # every up instance failed this call: retry on any rather than wait
        except PyMongoError:
            pass
    try:
        return pool.acquire(checkpoint, avoid)
    except ModelError as exc:
        if errors:
            exc.message = f"{exc.message} (after {attempts} failed attempts: {'; '.join(errors)})"
            exc.args = (exc.message,)
        raise


def _interrupt_later(client: SDClient, timeout_s: float) -> None:
    """A timed-out generation may still be running on the GPU; ask the WebUI to stop it (best effort)."""

    def go() -> None:
        try:
            client.interrupt(timeout_s=timeout_s)
        except (SDError, RuntimeError):
            pass

    threading.Thread(target=go, name="sd-interrupt", daemon=True).start()
