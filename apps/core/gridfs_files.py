"""Writing one image into GridFS in two inserts, readable by any GridFS reader.

Why: pymongo's `GridIn` (behind `GridFSBucket.upload_from_stream_with_id`) first checks whether the
bucket's indexes exist, with a `find_one` on `files` and one on `chunks`, for every file it writes:
four round trips per image where two do. Here the two indexes the GridFS specification names are
created once per process at start (`apps.core.storage.create_indexes`), and each file is its chunks
(`insert_many`) followed by its `files` document, the order GridIn uses, so a reader never sees a file
whose chunks are missing.
Reading and deleting stay pymongo's (`GridFSBucket`); tests/test_gridfs_files.py reads back with it.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from bson.binary import Binary
from pymongo import ASCENDING
from pymongo.collection import Collection
from pymongo.errors import BulkWriteError, PyMongoError

log = logging.getLogger(__name__)

CHUNK_SIZE = 255 * 1024  # the GridFS default (pymongo's DEFAULT_CHUNK_SIZE)
DUPLICATE_KEY = 11000


def ensure_indexes(files: Collection, chunks: Collection) -> None:
    """The specification's indexes: files by (filename, uploadDate), chunks unique by (files_id, n)."""
    files.create_index([("filename", ASCENDING), ("uploadDate", ASCENDING)])
    chunks.create_index([("files_id", ASCENDING), ("n", ASCENDING)], unique=True)


def write_file(
    files: Collection,
    chunks: Collection,
    file_id: Any,
    filename: str,
    data: bytes,
    metadata: dict[str, Any],
) -> None:
    """Store `data` as file `file_id`. On failure no chunk of ours is left behind (best effort); an id
    that is taken already (its chunks exist: the unique index refuses ours) is left alone."""
    pieces = [
        {"files_id": file_id, "n": n, "data": Binary(data[start : start + CHUNK_SIZE])}
        for n, start in enumerate(range(0, len(data), CHUNK_SIZE))
    ]
    try:
        if pieces:
            chunks.insert_many(pieces, ordered=True)
    except BulkWriteError as exc:
        if not any(e.get("code") == DUPLICATE_KEY for e in exc.details.get("writeErrors", [])):
            _remove_chunks(chunks, file_id)
        raise
    except PyMongoError:
        _remove_chunks(chunks, file_id)
        raise
    try:
        files.insert_one(
            {
                "_id": file_id,
                "length": len(data),
                "chunkSize": CHUNK_SIZE,
                "uploadDate": datetime.now(UTC),
                "filename": filename,
                "metadata": metadata,
            }
        )
    except PyMongoError:
        _remove_chunks(chunks, file_id)
        raise


def _remove_chunks(chunks: Collection, file_id: Any) -> None:
    try:
        chunks.delete_many({"files_id": file_id})
    except PyMongoError as exc:  # readers look files up by their files document: these are unreachable
        log.warning("GridFS: could not remove the chunks of unwritten file %s: %s", file_id, exc)
