"""The collaborators every service needs, built once per app and passed explicitly.

Routes fetch them with `services()`; services receive them as an argument and never
touch Flask globals, so they can run inside job threads and CLI commands alike.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from flask import current_app
from pymongo import MongoClient
from pymongo.database import Database

from config import Settings

from .jobs import JobManager
from .sse import JobWatcher
from .storage import ImageStore

if TYPE_CHECKING:
    from agent.llm import LLM
    from agent.prompts import PromptLibrary
    from agent.types import ImageProvider


@dataclass
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

    def close(self) -> None:
        self.jobs.shutdown(grace_s=0)
        self.client.close()


def services() -> Services:
    return current_app.extensions["services"]
