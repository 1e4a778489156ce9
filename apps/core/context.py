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

from .jobs import JobManager
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
    extras: dict[str, Any] = field(default_factory=dict)

    closers: list[Callable[[], None]] = field(default_factory=list)
    closed: bool = False

    def close(self, grace_s: float = 0) -> None:
        """Drain jobs, then close everything holding threads or sockets (image pool, limiter store,
        database), so a worker or a test exits without a hang. Each closer runs even if one fails.
        Idempotent: the exit hook (apps/core/lifecycle.py) closes whatever was not closed before."""
        if self.closed:
            return
        self.closed = True
        from .lifecycle import untrack

        untrack(self)
        self.jobs.shutdown(grace_s=grace_s)
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
