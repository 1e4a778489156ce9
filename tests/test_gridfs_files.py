"""Images are written in GridFS's layout in two inserts, and pymongo's own GridFS reader reads them back.

On the embedded database over a real socket; the round trips are counted with pymongo's command
monitoring on a client of this test's own (no patching).
"""

from __future__ import annotations

import io
import os
from typing import Any

import gridfs
import pytest
from PIL import Image
from pymongo import MongoClient
from pymongo.errors import BulkWriteError, DuplicateKeyError

from apps.core import gridfs_files, storage
from apps.core.storage import ImageStore
from tests.mongo_commands import CommandLog


def _png(side: int = 64) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def test_a_saved_image_costs_two_inserts(mongo_uri: str, db_name: str) -> None:
    listener = CommandLog(db_name)
    with MongoClient(mongo_uri, event_listeners=[listener], tz_aware=True) as client:
        db = client[db_name]
        storage.create_indexes(db)
        store = ImageStore(db, max_bytes=1 << 20, max_side=4096, cache_bytes=0)
        data = _png()
        listener.clear()
        image_id = store.save(data, app="test")
        assert listener.seen == [("insert", "images.chunks"), ("insert", "images.files")]
        info = store.info(image_id)
        assert info is not None and info.length == len(data) and info.content_type == "image/png"
        assert store.load(image_id) == data
        assert gridfs.GridFSBucket(db, "images").open_download_stream(image_id).read() == data
        client.drop_database(db_name)


@pytest.mark.parametrize("size", [0, 1, gridfs_files.CHUNK_SIZE, 2 * gridfs_files.CHUNK_SIZE + 17])
def test_pymongo_reads_what_we_write(db: Any, size: int) -> None:
    files, chunks = db["images.files"], db["images.chunks"]
    gridfs_files.ensure_indexes(files, chunks)
    data = os.urandom(size)
    gridfs_files.write_file(files, chunks, "f1", "f1.bin", data, {"app": "t"})
    out = gridfs.GridFSBucket(db, "images").open_download_stream("f1")
    assert out.read() == data
    assert out.length == size and out.filename == "f1.bin" and out.metadata == {"app": "t"}
    assert chunks.count_documents({"files_id": "f1"}) == -(-size // gridfs_files.CHUNK_SIZE)
    gridfs.GridFSBucket(db, "images").delete("f1")  # pymongo deletes it too
    assert chunks.count_documents({"files_id": "f1"}) == 0


def test_a_failed_write_leaves_no_chunks(db: Any) -> None:
    files, chunks = db["images.files"], db["images.chunks"]
    gridfs_files.ensure_indexes(files, chunks)
    files.insert_one({"_id": "taken", "length": 0, "chunkSize": gridfs_files.CHUNK_SIZE})
    with pytest.raises(DuplicateKeyError):
        gridfs_files.write_file(files, chunks, "taken", "x.bin", b"abc", {})
    assert chunks.count_documents({"files_id": "taken"}) == 0
    gridfs_files.write_file(files, chunks, "free", "y.bin", b"abc", {})
    with pytest.raises(BulkWriteError):  # the chunk index is unique: a second write is refused ...
        gridfs_files.write_file(files, chunks, "free", "y.bin", b"xyz", {})
    assert gridfs.GridFSBucket(db, "images").open_download_stream("free").read() == b"abc"  # ... untouched
