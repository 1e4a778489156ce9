"""Retryable writes are off against the embedded database, on (pymongo's default) against any other
(apps/core/embedded_mongo.py says why; `python bench/retry_writes.py` measures it)."""

from __future__ import annotations

from typing import Any

from pymongo import MongoClient

from apps.core.db import connect
from apps.core.embedded_mongo import uri_for
from config import load_settings


def test_embedded_uris_turn_retryable_writes_off() -> None:
    for uri in (uri_for(27017), uri_for(27017, "p@ss:word")):
        client: MongoClient = MongoClient(uri, connect=False)
        try:
            assert client.options.retry_writes is False, uri
        finally:
            client.close()


def test_the_apps_clients_follow_the_uri(mongo_uri: str, openai_app: Any) -> None:
    services = openai_app.extensions["services"]
    assert services.db.client.options.retry_writes is False  # the test database is the embedded one
    limiter = openai_app.extensions.get("creativity_limiter")
    if limiter is not None:
        assert limiter.storage.storage.options.retry_writes is False
    # any other URI keeps pymongo's default (port 1 on loopback: nothing answers, nothing is sent)
    settings = load_settings({"MONGO_URI": "mongodb://127.0.0.1:1/", "MONGO_DB": "x"})
    client, _ = connect(settings)
    try:
        assert client.options.retry_writes is True
    finally:
        client.close()
