"""Database outages answer 503 JSON with Retry-After, never an HTML page, a generic 500 or a hang.

pymongo raises ServerSelectionTimeoutError (no server within serverSelectionTimeoutMS,
5 s here), AutoReconnect / NetworkTimeout (a connection broke mid-operation) and
ConnectionFailure; all of them mean "the database is away for now", which is the
server's fault and temporary, so the client is told to retry. The MongoClient
reconnects by itself once the database is back: nothing here needs a restart.

Registered on the app, these handlers are more specific than the catch-all
`Exception` handler in errors.py, so they win for these exception types.
"""

from __future__ import annotations

import logging

from flask import Flask, Response, request
from pymongo.errors import ConnectionFailure, NotPrimaryError

from .errors import error_response

log = logging.getLogger(__name__)

RETRY_AFTER_S = 5


def database_unavailable(exc: Exception) -> Response:
    log.warning("database unavailable on %s %s: %s", request.method, request.path, type(exc).__name__)
    return error_response(
        503, "the database is temporarily unavailable; retry shortly", code="database_unavailable",
        headers={"Retry-After": str(RETRY_AFTER_S)}, envelope_code=2,
    )


def init_resilience(app: Flask) -> None:
    # ConnectionFailure covers AutoReconnect, NetworkTimeout and ServerSelectionTimeoutError;
    # NotPrimaryError (an election in a replica set) is an AutoReconnect too, listed for clarity.
    for exc_type in (ConnectionFailure, NotPrimaryError):
        app.register_error_handler(exc_type, database_unavailable)
