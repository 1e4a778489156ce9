"""gunicorn settings: gthread workers so SSE streams and websockets aren't killed by the sync timeout.

The master starts the embedded MongoDB once for the host (when MONGO_URI is unset)
and hands its URI (with the credentials; never logged) to the workers through the environment,
supervises it (restarts it on the same port when it dies) and stops it on exit.
On SIGTERM each worker stops taking jobs, lets running ones finish within `graceful_timeout`
(or stops them and marks them failed, code `shutdown`), then closes its database clients.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

bind = os.environ.get(
    "GUNICORN_BIND", f"{os.environ.get('HOST', '127.0.0.1')}:{os.environ.get('PORT', '5000')}"
)
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "apps.core.gunicorn_worker.JsonErrorWorker"  # gthread, with JSON 400/414/431 answers
threads = int(os.environ.get("GUNICORN_THREADS", "32"))  # each open SSE stream / websocket holds a thread
timeout = 120  # gthread: heartbeat-based, long streams are fine
graceful_timeout = int(os.environ.get("GRACEFUL_TIMEOUT", "30"))
keepalive = 5
accesslog = os.environ.get("GUNICORN_ACCESSLOG") or None
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))

_started_mongo = False
_started_llm = False
_mongo_port = 0
_supervisor = None  # apps.core.embedded_mongo.Supervisor, in the master, when it owns the database


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn hook signature
    global _started_mongo, _started_llm, _mongo_port
    _prepare_metrics_dir()
    from config import exit_on_config_error, load_settings

    with exit_on_config_error():  # a bad setting: one line per key, no traceback, the master exits
        settings = load_settings()
    if settings.LLM_PROVIDER == "local" and not _local_model_runs(server, settings):
        pass  # workers start anyway: /health says why the model is not ok, model calls fail cleanly
    elif settings.LLM_PROVIDER == "local" and (
        settings.LOCAL_LLM_MODE == "server" or (settings.LOCAL_LLM_MODE == "auto" and server.cfg.workers > 1)
    ):
        # one model per host instead of one copy per worker
        from agent.llm.providers.local_server import ensure_local_llm_server

        url = ensure_local_llm_server(
            settings.LOCAL_MODEL_PATH,
            settings.LOCAL_N_CTX,
            settings.DATA_DIR / "local-llm",
            settings.LOCAL_THREADS,
        )
        os.environ["LOCAL_LLM_SHARED"] = "1"
        _started_llm = True
        server.log.info("shared local model server at %s", url)
    if os.environ.get("MONGO_URI"):
        return
    from apps.core.embedded_mongo import ensure_embedded_mongo, redact_uri

    mongo = ensure_embedded_mongo(settings.DATA_DIR, settings.EMBEDDED_MONGO_PORT)
    os.environ["MONGO_URI"] = mongo.uri
    os.environ["EMBEDDED_MONGO"] = "1"  # so /health can still say the database is the embedded one
    _started_mongo = mongo.owner
    _mongo_port = mongo.port
    server.log.info(
        "embedded MongoDB at %s (%s)", redact_uri(mongo.uri), "started" if mongo.owner else "shared"
    )


def when_ready(server) -> None:  # noqa: ANN001
    """Supervise the embedded database from the master (after any daemonize fork, which drops threads)."""
    global _supervisor
    if not _mongo_port:
        return
    from apps.core.embedded_mongo import Supervisor
    from config import load_settings

    interval_s = float(os.environ.get("EMBEDDED_MONGO_CHECK_S", "0.5"))  # how often the master looks
    _supervisor = Supervisor(
        load_settings().DATA_DIR, _mongo_port, interval_s=interval_s, logger=server.log
    ).start()


def _local_model_runs(server, settings) -> bool:  # noqa: ANN001 - gunicorn's Arbiter
    """The embedded model's self-test, once per start, in a child process (a SIGILL kills only the child).

    Its result is kept under DATA_DIR, where workers and /health read it.
    """
    from agent.llm.providers.local_selftest import selftest
    from agent.llm.providers.model_files import resolve_model_path
    from agent.types import ModelError

    try:
        path = resolve_model_path(settings.LOCAL_MODEL_PATH)
    except ModelError as exc:
        server.log.error("embedded model: %s", exc.message)
        return False
    result = selftest(path, settings.DATA_DIR / "local-llm", fresh=True)
    (server.log.info if result.ok else server.log.error)(result.summary())
    return result.ok


def _prepare_metrics_dir() -> None:
    """prometheus_client multiprocess mode: one directory of per-worker files, emptied at start."""
    import shutil
    import tempfile

    path = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or tempfile.mkdtemp(prefix="creativity-metrics-")
    shutil.rmtree(path, ignore_errors=True)
    os.makedirs(path, exist_ok=True)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path


def child_exit(server, worker) -> None:  # noqa: ANN001
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server) -> None:  # noqa: ANN001
    if _started_llm:
        from agent.llm.providers.local_server import stop_local_llm_server
        from config import load_settings

        stop_local_llm_server(load_settings().DATA_DIR / "local-llm")
    if _supervisor is not None:
        _supervisor.stop()  # first, or it would restart the database stopped below
    if _started_mongo or (_supervisor is not None and _supervisor.started_one):
        from apps.core.embedded_mongo import stop_embedded_mongo
        from config import load_settings

        stop_embedded_mongo(load_settings().DATA_DIR)


# Shutdown budget inside graceful_timeout (after which the master SIGKILLs the worker): running jobs
# get JOB_GRACE_S to finish, then ABORT_S to stop (in-flight image generations are interrupted, records
# written, leases released); the last seconds close the pool, limiter store and database.
_reserve_s = min(10.0, graceful_timeout / 2)
JOB_GRACE_S = max(0.0, graceful_timeout - _reserve_s)
ABORT_S = max(1.0, _reserve_s - 2.0)


def _services():  # noqa: ANN202 - the worker's Services, if its app was built
    import app as app_module

    application = getattr(app_module, "_app", None)
    return application.extensions["services"] if application is not None else None


def post_worker_init(worker) -> None:  # noqa: ANN001
    """Start draining jobs the moment SIGTERM arrives, not after the open connections close (the SSE
    streams of running jobs end only when their jobs end, and gunicorn waits for them); parse the prompt
    templates and freeze the start-up heap before the first request."""
    import signal
    import threading

    previous = signal.getsignal(signal.SIGTERM)

    def on_term(sig: int, frame) -> None:  # noqa: ANN001
        services = _services()
        if services is not None:  # from a thread: a signal handler must not wait for a lock
            threading.Thread(target=services.begin_shutdown, args=(JOB_GRACE_S, ABORT_S), daemon=True).start()
        if callable(previous):
            previous(sig, frame)

    signal.signal(signal.SIGTERM, on_term)
    signal.siginterrupt(signal.SIGTERM, False)
    services = _services()
    if services is not None:  # templates parsed now, not inside the first requests (and frozen below)
        started = time.monotonic()
        parsed = services.prompts.warm()
        worker.log.debug("%d prompt templates parsed in %.0f ms", parsed, (time.monotonic() - started) * 1000)
    from apps.core.worker_gc import freeze_startup_heap

    worker.log.debug("start-up heap frozen out of GC in %.0f ms", freeze_startup_heap())


def worker_exit(server, worker) -> None:  # noqa: ANN001
    """Wait for the job drain (started at SIGTERM, or now), then close the pool, limiter store and DB."""
    services = _services()
    if services is not None:
        services.close(grace_s=JOB_GRACE_S, abort_s=ABORT_S)
