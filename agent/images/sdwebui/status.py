"""What the SD pool reports about itself (for /health and the dashboards): read-only, from the shared
collections or a quick probe, never a change of leases or marks."""

from __future__ import annotations

from typing import Any

from pymongo.database import Database

from agent.images.sdwebui import health
from agent.images.sdwebui.client import SDClient
from agent.images.sdwebui.queue import WaitQueue


class PoolStatus:
    """The status half of `SDInstancePool` (a mixin: the pool sets these attributes)."""

    db: Database
    urls: list[str]
    clients: dict[str, SDClient]
    queue: WaitQueue
    depth: int
    ping_timeout_s: float
    max_queue_seen: int
    handovers: int
    claims: int

    def refresh_checkpoints(self, timeout_s: float | None = None) -> dict[str, str | None]:
        """Ask every instance which checkpoint it has loaded (for model affinity). Best effort."""
        return health.refresh_checkpoints(self.db, self.urls, timeout_s or self.ping_timeout_s)

    def health(self) -> dict[str, Any]:
        """From the shared collections only (no call to any instance)."""
        return health.status(self.db, self.urls, self.queue.length, self.depth)

    def answering(self, timeout_s: float | None = None) -> dict[str, bool]:
        """Which instances answer the pool's own probe (`SDClient.ping`) now; all pinged at once.

        For /health: the shared state says what the pool last saw (an instance nobody used yet is
        "up" whether or not anything listens), this says whether an image request could be served.
        """
        return health.answering(self.clients, self.urls, timeout_s or self.ping_timeout_s)

    def stats(self) -> dict[str, Any]:
        return {
            **health.served(self.db, self.urls),
            "max_queue_this_process": self.max_queue_seen,
            "handovers_this_process": self.handovers,
            "claims_this_process": self.claims,
            "depth": self.depth,
        }
