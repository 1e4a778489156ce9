"""gunicorn's gthread worker, answering its own protocol errors in JSON like the app does.

gunicorn answers what it refuses before Flask sees a request (a request line over
`limit_request_line`: 414; too many or too large headers: 431; a bad header byte, a bad request
line: 400) with a small HTML page written by `gunicorn.util.write_error`. Every other error of this
server is JSON (`apps/core/errors.py`), and clients parse it; so this worker replaces that one writer,
in its own process, with one that writes the same status in our JSON shape.
"""

from __future__ import annotations

import json
import socket

from gunicorn import util
from gunicorn.workers.gthread import ThreadWorker

_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "uri_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_json_error(sock: socket.socket, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `write_error`, with the app's JSON error body instead of HTML."""
    body = json.dumps(
        {"error": {"status": status_int, "code": _CODES.get(status_int, "error"), "message": mesg or reason}}
    ).encode("ascii")  # ASCII: \\u-escapes any byte
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode("latin1")
    util.write_nonblock(sock, head + body)


class JsonErrorWorker(ThreadWorker):
    """gthread worker (SSE and websockets need threads) whose protocol errors are JSON."""

    def init_process(self) -> None:
        util.write_error = write_json_error  # this worker process only; gunicorn looks it up per error
        super().init_process()
