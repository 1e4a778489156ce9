"""Fake model services (real HTTP servers on 127.0.0.1) used by the tests.

- `tests.fakes.fake_openai.FakeOpenAI`: OpenAI / Azure OpenAI (chat, streaming, moderations, images, models).
- `tests.fakes.fake_sd.FakeSD`: an AUTOMATIC1111 Stable Diffusion WebUI (+ segment-anything extension).

Both run a small Flask app on werkzeug's threaded server in a background thread. `LocalServer`
below is the shared plumbing; it exists so faults are real: `close_listener()` really closes the
listening socket (connection refused) and `abort_connections()` really cuts open connections, and
`stop()` returns at once even while handlers are hanging (they wait on `released`).
"""

from __future__ import annotations

import socket
import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

HOST = "127.0.0.1"


class _Handler(WSGIRequestHandler):
    """Registers its connection with the server (so it can be cut) and keeps the test log quiet."""

    def setup(self) -> None:
        super().setup()
        owner: LocalServer | None = getattr(self.server, "fake_owner", None)
        if owner is not None:
            owner._track(self.connection)

    def finish(self) -> None:
        owner: LocalServer | None = getattr(self.server, "fake_owner", None)
        if owner is not None:
            owner._untrack(self.connection)
        super().finish()

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


class LocalServer:
    """One WSGI app served on 127.0.0.1 in a daemon thread; restartable on the same port."""

    def __init__(self, wsgi_app: Any, port: int = 0) -> None:
        self._wsgi_app = wsgi_app
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        self.port = port
        self.released = threading.Event()  # set by stop(): hanging/sleeping handlers give up at once

    @property
    def base(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def stopped(self) -> bool:
        return self.released.is_set()

    def start(self) -> None:
        self.released.clear()
        self.open_listener()

    def open_listener(self) -> None:
        if self._server is not None:
            return
        server = make_server(HOST, self.port, self._wsgi_app, threaded=True, request_handler=_Handler)
        server.fake_owner = self  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_port
        self._thread = threading.Thread(
            target=server.serve_forever,
            kwargs={"poll_interval": 0.02},
            name=f"fake-server-{self.port}",
            daemon=True,
        )
        self._thread.start()

    def close_listener(self) -> None:
        """Stop accepting: new connections are refused; the port is remembered for open_listener()."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None

    def abort_connections(self) -> None:
        """Cut every open connection (clients see a reset / an incomplete response)."""
        with self._conns_lock:
            conns = list(self._conns)
        for conn in conns:
            abort_socket(conn)

    def stop(self) -> None:
        """Refuse new connections, cut open ones, then release waiting handlers (their late writes fail)."""
        self.close_listener()
        self.abort_connections()
        self.released.set()

    def wait(self, seconds: float) -> bool:
        """Sleep `seconds` unless stopped first; True when stopped."""
        return self.released.wait(seconds) if seconds > 0 else self.released.is_set()

    def _track(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.add(conn)

    def _untrack(self, conn: socket.socket) -> None:
        with self._conns_lock:
            self._conns.discard(conn)


def abort_socket(conn: Any) -> None:
    """Shut a socket down both ways (the handler's later writes fail with a broken pipe)."""
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
