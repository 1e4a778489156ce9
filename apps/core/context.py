"""The collaborators every service needs, built once per app and passed explicitly.

Routes fetch them with `services()`; services receive them as an argument and never
touch Flask globals, so they can run inside job threads and CLI commands alike.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import current_app
from pymongo import MongoClient
from pymongo.database import Database

from config import Settings

from .export_catalog import ExportCatalog
from .jobs import JobManager
from .lifecycle import untrack
from .sse import JobWatcher
from .storage import ImageStore

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from agent.llm import LLM
    from agent.prompts import PromptLibrary
    from agent.types import ImageProvider


@dataclass(eq=False)  # identity equality: tracked in a WeakSet until closed (apps/core/lifecycle.py)
class Services:
    settings: Settings
    client: MongoClient
    db: Database
    images: ImageStore
    jobs: JobManager
    watcher: JobWatcher
    llm: LLM
    image_provider: ImageProvider
    prompts: PromptLibrary
    exports: ExportCatalog = field(default_factory=ExportCatalog)  # filled by each app's init_app
    extras: dict[str, Any] = field(default_factory=dict)

    closers: list[Callable[[], None]] = field(default_factory=list)
    closed: bool = False

    def __post_init__(self) -> None:
        self.jobs.on_abort(self._interrupt_images)

    def _interrupt_images(self) -> None:
        """Shutdown: in-flight SD generations return what they have, so their jobs end in time."""
        inner = getattr(self.image_provider, "inner", self.image_provider)
        interrupt = getattr(inner, "interrupt_held", None)
        if interrupt is not None:
            interrupt()

    def begin_shutdown(self, grace_s: float, abort_s: float = 5.0) -> None:
        """Stop taking jobs now and start draining them in the background (from a SIGTERM handler)."""
        self.jobs.begin_shutdown(grace_s, abort_s)

    def close(self, grace_s: float = 0, abort_s: float = 5.0) -> None:
        """Drain jobs, then close everything holding threads or sockets (image pool, limiter store,
        database), so a worker or a test exits without a hang. Each closer runs even if one fails.
        Idempotent: the exit hook (apps/core/lifecycle.py) closes whatever was not closed before."""
        if self.closed:
            return
        self.closed = True

        untrack(self)
        # jobs first: their threads finish their model calls, write generation records and release SD
        # leases while the database is still open; only then the image pool, limiter store and database
        self.jobs.shutdown(grace_s=grace_s, abort_s=abort_s)
        inner = getattr(self.image_provider, "inner", self.image_provider)
        steps = [
            getattr(inner, "close", None),
            getattr(self.llm, "close", None),
            *reversed(self.closers),
            self.client.close,
        ]
        for step in steps:
            if step is None:
                continue
            try:
                step()
            except Exception:  # noqa: BLE001 - closing is best effort; the next step still runs
                log.warning("closing %r failed", step, exc_info=True)


def services() -> Services:
    return current_app.extensions["services"]
