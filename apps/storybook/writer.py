"""The serial database writer of one book: its writes in order, off the model's text path."""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger(__name__)


class Writer:
    """Every database write of one book (events, book fields, progress) in order, on one thread.

    Keeps the writes (a few ms each, tens on the embedded server) off the text path: the next page's
    model call starts the moment the previous page's stream ends. One thread also means the event
    log's sequence numbers are allocated and inserted in order, so a reader never skips one.
    """

    def __init__(self, name: str) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self.error: BaseException | None = None

    def submit(self, fn: Any, *args: Any) -> None:
        self._pool.submit(self._run, fn, args)

    def _run(self, fn: Any, args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - remembered and raised by flush() in the job's thread
            log.warning("storybook write failed: %s", exc)
            if self.error is None:
                self.error = exc

    def flush(self, timeout: float = 60.0) -> None:
        """Wait until everything submitted so far is written; raise the first write error."""
        self._pool.submit(lambda: None).result(timeout)
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        try:
            self._pool.submit(lambda: None).result(60.0)
        finally:
            self._pool.shutdown(wait=False)
