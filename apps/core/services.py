"""Build the `Services` bundle from Settings: database, image store, jobs, LLM, image provider, prompts.

The one place that wires the agent layer to the apps; `create_app` calls it once per app.
"""

from __future__ import annotations

from agent.images import build_image_provider
from agent.llm.build import build_llm
from agent.prompts import PromptLibrary
from config import Settings

from .context import Services
from .db import connect
from .jobs import JobManager
from .lifecycle import track
from .sse import JobWatcher
from .storage import ImageStore


def build_services(settings: Settings) -> Services:
    """Every collaborator, built once; closed at exit before the embedded database stops."""
    client, db = connect(settings)
    store = ImageStore(
        db,
        max_bytes=settings.MAX_IMAGE_BYTES,
        max_side=settings.MAX_IMAGE_SIDE,
        cache_bytes=settings.IMAGE_CACHE_MB << 20,
    )
    prompts = PromptLibrary(settings.PROMPTS_DIR)
    jobs = JobManager(db, workers=settings.JOB_WORKERS, lease_s=settings.JOB_LEASE_S)
    services = Services(
        settings=settings,
        client=client,
        db=db,
        images=store,
        jobs=jobs,
        watcher=JobWatcher(jobs, poll_s=settings.SSE_POLL_S),
        llm=build_llm(settings, db, prompts),
        image_provider=build_image_provider(settings, db, store.save),
        prompts=prompts,
    )
    track(services)  # closed at exit before the embedded database stops (flask commands, dev server)
    return services
