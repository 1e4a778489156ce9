"""A call queued behind a running image (`SD_QUEUE_DEPTH=2`) is sent shortly before that image ends.

Why: sent at once, it sits inside that WebUI for up to a whole generation, committed to it. If another
instance goes idle meanwhile (the queue ran dry: callers between requests, one request's images spread
unevenly over the instances), the idle one waits for new work while this call waits behind the running
image (the refinement benchmark once showed one instance idle for 0.79 s of a 25 s run; docs/pool.md).
Held back until the running image has `send_ahead_s` left (the WebUI's own
`/sdapi/v1/progress` estimate), it still arrives before that image ends, so the WebUI starts it without
a round trip in between; until then it moves to an instance that goes idle.

Fairness: the move only happens when nobody waits in the queue (`SDInstancePool.claim_idle`), so it
overtakes no one; the seat it leaves is freed for the next caller. A running image that ends well before
its estimate can let the caller given that instance next start first (one place, on one instance).
"""

from __future__ import annotations

import threading
import time
from typing import Any, Protocol

from agent.images.sdwebui.client import SDClient, SDError
from agent.images.sdwebui.queue import Lease

UNKNOWN_POLL_S = 0.1  # the WebUI cannot estimate yet (no sampling step done): look again this soon
MAX_WAIT_S = 1.0  # look again at least this often (a freed instance on another host sends no signal)


class FreedSignal:
    """Pulsed whenever this process sees an instance freed (its own release, or a peer's datagram)."""

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self.count = 0

    def pulse(self) -> None:
        with self._cv:
            self.count += 1
            self._cv.notify_all()

    def wait(self, seen: int, timeout_s: float) -> int:
        """Until a pulse after `seen` (the count last read) or `timeout_s`; the count now."""
        with self._cv:
            self._cv.wait_for(lambda: self.count != seen, max(0.0, timeout_s))
            return self.count


class HoldingPool(Protocol):
    """What `hold_back` needs of the pool."""

    clients: dict[str, SDClient]
    send_ahead_s: float
    timeout_s: float
    ping_timeout_s: float
    freed: FreedSignal

    def claim_idle(self, n: int, checkpoint: str | None = None, exclude: Any = ()) -> list[Lease]: ...

    def release(self, lease: Lease, *, ok: bool = True, **kwargs: Any) -> None: ...

    def stopping_error(self) -> Any: ...


def seconds_left(progress: dict[str, Any]) -> float | None:
    """What a WebUI's `/sdapi/v1/progress` says its running job has left: 0.0 when nothing runs, None when
    it cannot tell yet (the WebUI estimates from the sampling steps done)."""
    state = progress.get("state") or {}
    if not state.get("job_count") and not state.get("job"):
        return 0.0
    eta = progress.get("eta_relative")
    if not isinstance(eta, (int, float)) or not progress.get("progress"):
        return None
    return max(0.0, float(eta))


def hold_back(pool: HoldingPool, lease: Lease, exclude: list[str], checkpoint: str | None) -> Lease:
    """The lease to send the call on: `lease` once its instance's running image is about to end (or at
    once when it is not queued, holding back is off, or the WebUI cannot say), or an idle instance's
    lease if one came free first (then `lease` is freed)."""
    if not lease.queued or pool.send_ahead_s <= 0:
        return lease
    client = pool.clients[lease.url]
    give_up_at = time.monotonic() + pool.timeout_s
    seen = pool.freed.count
    look = False  # an instance was freed (or we waited long): see whether one is idle now
    while pool.stopping_error() is None and time.monotonic() < give_up_at:
        try:
            left = seconds_left(client.progress(timeout_s=pool.ping_timeout_s))
        except SDError:
            return lease  # the call itself finds out what is wrong (and is retried elsewhere)
        if left is not None and left <= pool.send_ahead_s:
            return lease
        if look:
            moved = pool.claim_idle(1, checkpoint, exclude=[*exclude, lease.url])
            if moved:
                pool.release(lease, ok=False)  # unused: freed, no health recorded
                return moved[0]
        wait_s = UNKNOWN_POLL_S if left is None else left - pool.send_ahead_s
        now_seen = pool.freed.wait(seen, min(wait_s, MAX_WAIT_S))
        look, seen = now_seen != seen or wait_s > MAX_WAIT_S, now_seen
    return lease
