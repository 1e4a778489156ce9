"""The indexes of the core and the agent layer, created by every process at start.

Each app creates its own in its `init_app`. Why every process: a fresh gunicorn worker must not
depend on what another process did; creating an existing index is a no-op.
"""

from __future__ import annotations

from pymongo.database import Database

from agent.images.sdwebui.pool import ensure_pool_indexes
from agent.records import create_generation_indexes

from . import auth, jobs, spend, storage


def create_core_indexes(db: Database) -> None:
    create_generation_indexes(db)
    spend.create_indexes(db)  # the daily-cap query on generations
    jobs.create_indexes(db)
    storage.create_indexes(db)
    auth.create_indexes(db)
    ensure_pool_indexes(db)
