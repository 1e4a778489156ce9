"""MongoDB connection and start-up indexes.

`MONGO_URI` set: use it (a replica set or Atlas in production). Unset: the
embedded server (see embedded_mongo.py), shared by every worker on the host.
Index functions are listed in `apps/indexes.py` and all run in every process at
start-up (creating an existing index is a no-op). `register_indexes` only marks
them, so a test can check that the list misses none.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import gridfs
from pymongo import MongoClient
from pymongo.database import Database

from config import Settings

from .embedded_mongo import ensure_embedded_mongo, stop_at_exit

log = logging.getLogger(__name__)

IndexFn = Callable[[Database], None]
_INDEX_FUNCTIONS: list[IndexFn] = []


def register_indexes(fn: IndexFn) -> IndexFn:
    """Decorator: mark `fn(db)` as an index function (it must also be listed in apps/indexes.py)."""
    if fn not in _INDEX_FUNCTIONS:
        _INDEX_FUNCTIONS.append(fn)
    return fn


def resolve_mongo_uri(settings: Settings) -> str:
    if settings.MONGO_URI:
        return settings.MONGO_URI
    server = ensure_embedded_mongo(settings.DATA_DIR, settings.EMBEDDED_MONGO_PORT)
    stop_at_exit(settings.DATA_DIR, server)
    return server.uri


def connect(settings: Settings) -> tuple[MongoClient, Database]:
    uri = resolve_mongo_uri(settings)
    client: MongoClient = MongoClient(
        uri,
        serverSelectionTimeoutMS=5000,
        connectTimeoutMS=5000,
        socketTimeoutMS=30000,
        retryWrites=True,
        tz_aware=True,
        appname="creativity-server",
    )
    return client, client[settings.MONGO_DB]


def registered_index_functions() -> list[IndexFn]:
    """The marked index functions of the modules imported so far (for the completeness test)."""
    return list(_INDEX_FUNCTIONS)


def gridfs_bucket(db: Database) -> gridfs.GridFSBucket:
    return gridfs.GridFSBucket(db, bucket_name="images")


def ping(db: Database) -> dict:
    """Database status for /health."""
    try:
        db.command("ping")
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - health reports any failure as text
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
