"""A real HTTP server on 127.0.0.1 in a background thread, for the fake model services.

Supports what fault-injection needs: stopping quickly even while handlers hang, and
"dying" (closing the listening socket so connections are refused) then reviving on
the same port.
"""

from __future__ import annotations

import threading
from typing import Any

from werkzeug.serving import BaseWSGIServer, make_server


class BackgroundServer:
    def __init__(self, wsgi_app: Any) -> None:
        self._wsgi_app = wsgi_app
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self.port = 0
        self.release = threading.Event()  # set on stop: hanging handlers return

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self, port: int) -> None:
        server = make_server("127.0.0.1", port, self._wsgi_app, threaded=True)
        server.daemon_threads = True  # type: ignore[attr-defined]
        self._server = server
        self.port = server.server_port
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def start(self) -> None:
        self.release.clear()
        self._serve(self.port)

    def close_listener(self) -> None:
        """Stop accepting (connection refused) without forgetting the port."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def reopen(self) -> None:
        if self._server is None:
            self._serve(self.port)

    def stop(self) -> None:
        self.release.set()
        self.close_listener()
