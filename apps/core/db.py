"""MongoDB connection and start-up indexes.

`MONGO_URI` set: use it (a replica set or Atlas in production). Unset: the
embedded server (see embedded_mongo.py), shared by every worker on the host.
Indexes: every process creates them at start-up (creating an existing index is a
no-op): the core's in `apps/core/indexes.py`, each app's in its `init_app`.

Durability: research data (participants' inputs, saved work, generated items and images, generation
records, feedback) is written with `j: true` (`RESEARCH_COLLECTIONS`, `research_write_concern`), so an
acknowledged write survives a kill -9 of the database right after the 200. Coordination collections
(job events and leases, rate-limit counters, LLM slots, the SD pool) keep the client's default:
they are rewritten constantly and a lost update there is re-derived.
"""

from __future__ import annotations

import logging
from typing import Any

import gridfs
from pymongo import MongoClient, WriteConcern
from pymongo.collection import Collection
from pymongo.database import Database

from config import Settings

from .embedded_mongo import ensure_embedded_mongo, stop_at_exit

log = logging.getLogger(__name__)


IMAGES_BUCKET = "images"
# Research data: written journaled. Every collection exported (apps/core/export.py) belongs here;
# tests/test_db_safety.py checks that none is missed. `jobs` too: a job's input, status and result are
# research data, and a lost "done" comes back "working" and is failed by the reaper. Lease renewals
# (jobs and leased records) go through `coordination()` instead: they are rewritten every heartbeat.
RESEARCH_COLLECTIONS: frozenset[str] = frozenset(
    {
        "jobs",
        "generations",
        "ideation_requests",
        "ideation_users",
        "ideation_time_records",
        "ideation_mainbody",
        "refinement_users",
        "refinement_sessions",
        "refinement_requests",
        "refinement_stimuli",
        "refinement_versions",
        "refinement_saves",
        "storyteller_sessions",
        "storyteller_versions",
        "storyteller_feedback",
        "storybooks",
        f"{IMAGES_BUCKET}.files",
        f"{IMAGES_BUCKET}.chunks",
    }
)

# Fail fast when the database is away: a dead server refuses at once, so server selection is what an
# in-flight call waits for (its one retry included) before its 503; the socket timeout bounds a hung
# server and stays above the slowest legitimate single round trip (an export batch, an image read).
SERVER_SELECTION_TIMEOUT_MS = 2000
CONNECT_TIMEOUT_MS = 2000
SOCKET_TIMEOUT_MS = 10000


def research_write_concern(base: WriteConcern) -> WriteConcern:
    """`base` (the client's, e.g. `w: majority` from MONGO_URI) plus `j: true`."""
    return WriteConcern(**{**base.document, "j": True})


def coordination(collection: Collection) -> Collection:
    """`collection` with the client's default write concern (no journal wait): for hot rewrites."""
    return collection.with_options(write_concern=collection.database.client.write_concern)


class DurableDatabase(Database):
    """A Database whose research collections default to the journaled write concern.

    pymongo builds collections through `get_collection` (attribute access goes through `__getitem__`),
    so overriding both covers `db.name`, `db["name"]` and `db.get_collection("name")`.
    """

    def __getitem__(self, name: str) -> Collection:
        return self.get_collection(name)

    def get_collection(self, name: str, *args: Any, **kwargs: Any) -> Collection:
        if name in RESEARCH_COLLECTIONS and len(args) < 3 and kwargs.get("write_concern") is None:
            kwargs["write_concern"] = research_write_concern(self.write_concern)
        return super().get_collection(name, *args, **kwargs)


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
        serverSelectionTimeoutMS=SERVER_SELECTION_TIMEOUT_MS,
        connectTimeoutMS=CONNECT_TIMEOUT_MS,
        socketTimeoutMS=SOCKET_TIMEOUT_MS,
        tz_aware=True,  # retryWrites: the URI's (pymongo's default, off for the embedded server)
        appname="creativity-server",
    )
    return client, DurableDatabase(client, settings.MONGO_DB)


def gridfs_bucket(db: Database) -> gridfs.GridFSBucket:
    """The image store; its files and chunks are research data, so written journaled."""
    return gridfs.GridFSBucket(
        db, bucket_name=IMAGES_BUCKET, write_concern=research_write_concern(db.write_concern)
    )


def ping(db: Database) -> dict:
    """Database status for /health."""
    try:
        db.command("ping")
        return {"ok": True}
    except Exception as exc:  # noqa: BLE001 - health reports any failure as text
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
