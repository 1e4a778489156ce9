"""The worker hook freezes the start-up heap (apps/core/worker_gc.py; bench/gc_pause.py measures why)."""

from __future__ import annotations

import gc
import runpy
from pathlib import Path
from types import SimpleNamespace

from apps.core.worker_gc import freeze_startup_heap

ROOT = Path(__file__).resolve().parent.parent


def test_freeze_moves_the_heap_out_of_collections() -> None:
    gc.unfreeze()
    try:
        gc.collect()  # what earlier tests left as garbage is not "alive"
        alive = len(gc.get_objects())
        freeze_startup_heap()
        assert gc.get_freeze_count() >= alive * 0.9  # what existed is frozen
        assert len(gc.get_objects()) < alive * 0.1  # and no longer walked by a collection
    finally:
        gc.unfreeze()


def test_gunicorns_worker_hook_freezes_it() -> None:
    """post_worker_init in gunicorn.conf.py (run as gunicorn would, with a stand-in worker)."""
    import signal

    conf = runpy.run_path(str(ROOT / "gunicorn.conf.py"))
    logged: list[str] = []
    worker = SimpleNamespace(log=SimpleNamespace(debug=lambda msg, *a: logged.append(msg % a)))
    previous = signal.getsignal(signal.SIGTERM)
    gc.unfreeze()
    try:
        conf["post_worker_init"](worker)
        assert gc.get_freeze_count() > 0
        assert logged and "frozen" in logged[0]
    finally:
        gc.unfreeze()
        signal.signal(signal.SIGTERM, previous)
