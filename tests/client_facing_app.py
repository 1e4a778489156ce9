"""An app for tests that send what an outside client would (fuzzers, hostile bodies): real 500s, no test
errors, the fake OpenAI for text and placeholder images, on its own database that is dropped after."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pymongo import MongoClient


@contextmanager
def client_facing_app(
    mongo_client: MongoClient, mongo_uri: str, data_dir: Path, prefix: str, **overrides: Any
) -> Iterator[Any]:
    """create_app on a fresh `<prefix>_<hex>` database with `app.testing` off (an exception becomes the
    500 a client would get); closed and dropped on exit."""
    from app import create_app
    from tests.fakes.fake_openai import FakeOpenAI

    db_name = f"{prefix}_{secrets.token_hex(4)}"
    with FakeOpenAI() as fake:
        app = create_app(
            {
                "MONGO_URI": mongo_uri,
                "MONGO_DB": db_name,
                "DATA_DIR": str(data_dir / "data"),
                "LLM_PROVIDER": "openai",
                "OPENAI_BASE_URL": fake.url,
                "OPENAI_API_KEY": "k",
                "LLM_MODEL": "fake-model",
                "LLM_RETRY_BASE_S": 0.01,
                "LLM_MAX_RETRIES": 1,
                "IMAGE_PROVIDER": "placeholder",
                "RATE_LIMIT_ENABLED": False,  # these tests send far more than a person would
                "SSE_HEARTBEAT_S": 1.0,
                "JOB_LEASE_S": 5.0,
                **overrides,
            }
        )
        app.testing = False
        try:
            yield app
        finally:
            app.extensions["services"].close()
            mongo_client.drop_database(db_name)
