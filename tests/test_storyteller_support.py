"""Helpers shared by the storyteller tests (no tests here): a real threaded server for an app, a
WebSocket reader, and the research note's replay payload `P`."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from simple_websocket import Client, ConnectionClosed
from werkzeug.serving import WSGIRequestHandler, make_server

P: dict[str, Any] = {
    "maincharacter": "Paolo",
    "keywords": "aliens",
    "genre": "Thriller",
    "registro": "Conversational",
    "childsafe": False,
    "maxnowords": 100,
    "twist": False,
}
# row 1 of the original's committed data_stories.csv (its Prompt column), the byte-exact original prompt
ORIGINAL_ROW1_PROMPT = (
    "You are a writer. write a story, without extra comments or questions, of maximum 100 words, where the main "
    "characters names are Paolo. the story genre is Thriller and you have to use a Conversational register. The "
    "keywords of the story are aliens. the story has to have an introduction, a development and a finale."
)


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        return None


@contextlib.contextmanager
def live_server(app: Any) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (werkzeug, threaded: websockets work); yields 'http://127.0.0.1:PORT'."""
    server = make_server("127.0.0.1", 0, app, threaded=True, request_handler=_QuietHandler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def ws_url(base: str, path: str = "/storyteller/ws", **query: str) -> str:
    url = base.replace("http://", "ws://") + path
    if query:
        url += "?" + "&".join(f"{k}={v}" for k, v in query.items())
    return url


@dataclass
class WsResult:
    frames: list[str] = field(default_factory=list)
    code: int | None = None
    reason: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.frames)

    def json(self) -> list[dict[str, Any]]:
        return [json.loads(f) for f in self.frames]


def ws_read(
    url: str, *, timeout: float = 20.0, cancel_after: int | None = None, close_after: int | None = None
) -> WsResult:
    """Read every frame until the server closes; optionally send a cancel (or just disconnect) after N frames."""
    ws = Client.connect(url)
    out = WsResult()
    try:
        while True:
            message = ws.receive(timeout=timeout)
            if message is None:
                raise AssertionError(f"no frame within {timeout} s (got {len(out.frames)})")
            out.frames.append(message if isinstance(message, str) else message.decode())
            if cancel_after is not None and len(out.frames) == cancel_after:
                ws.send(json.dumps({"type": "cancel"}))
            if close_after is not None and len(out.frames) == close_after:
                ws.close()
                return out
    except ConnectionClosed as exc:
        out.code = int(exc.reason) if exc.reason is not None else None
        out.reason = exc.message
    return out
