"""WSGI entry point with a plain module attribute, for servers that import `module:callable` (uWSGI).

Why not `app:app`: `app.py` builds its app lazily through module `__getattr__` so that importing it
starts nothing; uWSGI looks the callable up in the module's dict, never sees it and answers every
request with a 500 ("unable to load app"). Here `application` is built at import, in each worker
(uwsgi.ini sets `lazy-apps`: pymongo clients and job threads must not cross a fork).

uWSGI has no hook that runs once in its master before the workers fork, which is where gunicorn
starts the embedded MongoDB once per host. Each uWSGI worker would race to start it, and the worker
that won would stop it when it is recycled, under the others. So under uWSGI `MONGO_URI` is required.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from app import create_app

try:
    import uwsgi  # noqa: F401 - a built-in module that exists only inside uWSGI

    UWSGI = True
except ImportError:
    UWSGI = False


def _require_mongo_uri() -> None:
    if UWSGI and not os.environ.get("MONGO_URI"):
        print(
            "config error: MONGO_URI: required under uWSGI (the embedded database is started once per host "
            "only by gunicorn's master); point it at a MongoDB, or run gunicorn -c gunicorn.conf.py app:app",
            file=sys.stderr,
        )
        raise SystemExit(1)


WS_UNSUPPORTED = (
    "WebSocket is not supported under uWSGI (flask-sock needs the raw client socket, which uWSGI does not "
    "put in the WSGI environ); use the SSE stream (GET /storyteller/stream) or run gunicorn"
)


def _refuse_websockets(app: Any) -> Callable[[dict, Callable], Iterable[bytes]]:
    """Under uWSGI a WebSocket upgrade gets a clear 501 instead of a 500 and a traceback in the log."""
    from apps.core.errors import error_response

    wsgi_app = app.wsgi_app

    def middleware(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("HTTP_UPGRADE", "").lower() == "websocket":
            with app.request_context(environ):
                resp = error_response(501, WS_UNSUPPORTED, code="websocket_unsupported")
            return resp(environ, start_response)
        return wsgi_app(environ, start_response)

    return middleware


_require_mongo_uri()
application = create_app()
if UWSGI:
    application.wsgi_app = _refuse_websockets(application)  # type: ignore[method-assign]
app = application
