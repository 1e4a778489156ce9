"""Application factory.

`create_app(test_config)` builds one Flask app (flask-openapi3's `OpenAPI`) from
Settings; `test_config` is a plain dict of setting overrides. `gunicorn app:app`
uses the module-level `app`, built lazily on first access so that importing this
module (tests, CLI) starts nothing. `python app.py` runs the development server.
"""

from __future__ import annotations

import logging
from typing import Any

from flask_cors import CORS
from flask_openapi3 import Info, OpenAPI

from config import Settings, exit_on_config_error, load_settings

log = logging.getLogger(__name__)


def create_app(test_config: dict[str, Any] | None = None) -> OpenAPI:
    settings = load_settings(test_config)
    app = OpenAPI(
        __name__,
        info=Info(
            title="Creativity apps server",
            version="0.1.0",
            description="storybook, ideation (StepIdeator), refinement (InsPilot/Refinity), storyteller",
        ),
        doc_prefix="/docs",
        doc_url="/openapi.json",
        validation_error_status=422,
    )
    init_config(app, settings)
    init_logging(app, settings)
    init_errors(app)
    init_resilience(app)
    init_cors(app, settings)
    services = init_services(app, settings)
    init_indexes(app)
    init_routes(app, settings)
    init_auth(app)
    init_openapi(app, settings)
    init_ratelimit(app, settings)
    init_cli(app)
    init_studies(app, services)
    services.jobs.start()
    return app


def init_config(app: OpenAPI, settings: Settings) -> None:
    app.config.update(
        SETTINGS=settings,
        MAX_CONTENT_LENGTH=settings.MAX_CONTENT_LENGTH,
        PROMPTS_DIR=str(settings.PROMPTS_DIR),
        JSON_SORT_KEYS=False,
        SECRET_KEY=settings.SECRET_KEY or "dev-only-not-secret",
    )
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    from apps.core.errors import validation_error_response

    app.validation_error_callback = validation_error_response


def init_studies(app: OpenAPI, services: Any) -> None:
    """STUDY conditions, cost per call, model metrics, /dashboard/, `flask study|calls`."""
    from apps.core.studies import init_studies as _init

    _init(app, services)


def init_logging(app: OpenAPI, settings: Settings) -> None:
    from apps.core.logs import configure_logging

    configure_logging(app, settings)


def init_errors(app: OpenAPI) -> None:
    from apps.core.errors import register_error_handlers

    register_error_handlers(app)


def init_resilience(app: OpenAPI) -> None:
    from apps.core.resilience import init_resilience as _init

    _init(app)


def init_auth(app: OpenAPI) -> None:
    from apps.core.auth import init_auth as _init

    _init(app)


def init_openapi(app: OpenAPI, settings: Settings) -> None:
    """/openapi.json for this AUTH_MODE: its security schemes, stream models, the API guide."""
    from apps.core.openapi import init_openapi as _init

    _init(app, settings.AUTH_MODE)


def init_ratelimit(app: OpenAPI, settings: Settings) -> None:
    from apps.core.ratelimit import init_ratelimit as _init

    _init(app, settings)


def init_cors(app: OpenAPI, settings: Settings) -> None:
    """`CORS_ORIGINS=*` (the default): `Access-Control-Allow-Origin: *` and never credentials, so no page
    on the web can read a participant's data with their browser's Basic credentials. Listed origins get
    their origin echoed with `Access-Control-Allow-Credentials: true`."""
    origins = settings.CORS_ORIGINS or ["*"]
    wildcard = "*" in origins
    if wildcard and len(origins) > 1:
        log.warning("CORS_ORIGINS mixes '*' with origins %s: serving '*' without credentials", origins)
    app.after_request(_merge_vary)  # registered before flask-cors's, so it runs after it
    # always_send: `*` even without an Origin (a cached copy then passes CORS too); a list only on a match
    CORS(
        app,
        origins="*" if wildcard else origins,
        send_wildcard=wildcard,
        supports_credentials=not wildcard,
        always_send=wildcard,
        expose_headers=["Content-Type", "ETag", "Retry-After", "X-Request-ID"],
        max_age=600,
    )


def _merge_vary(resp: Any) -> Any:
    """One `Vary` header: routes (images) and flask-cors may each add `Origin`."""
    values = resp.headers.getlist("Vary")
    if len(values) > 1:
        merged = list(dict.fromkeys(v.strip() for value in values for v in value.split(",") if v.strip()))
        resp.headers["Vary"] = ", ".join(merged)
    return resp


def init_services(app: OpenAPI, settings: Settings) -> Any:
    from agent.factory import build_image_provider
    from agent.llm.build import build_llm
    from agent.prompts import PromptLibrary
    from apps.core.context import Services
    from apps.core.db import connect
    from apps.core.jobs import JobManager
    from apps.core.lifecycle import track
    from apps.core.sse import JobWatcher
    from apps.core.storage import ImageStore

    client, db = connect(settings)
    store = ImageStore(
        db,
        max_bytes=settings.MAX_IMAGE_BYTES,
        max_side=settings.MAX_IMAGE_SIDE,
        cache_bytes=settings.IMAGE_CACHE_MB << 20,
    )
    prompts = PromptLibrary(settings.PROMPTS_DIR)
    jobs = JobManager(db, workers=settings.JOB_WORKERS, lease_s=settings.JOB_LEASE_S)
    services = Services(
        settings=settings,
        client=client,
        db=db,
        images=store,
        jobs=jobs,
        watcher=JobWatcher(jobs, poll_s=settings.SSE_POLL_S),
        llm=build_llm(settings, db, prompts),
        image_provider=build_image_provider(settings, db, store.save),
        prompts=prompts,
    )
    app.extensions["services"] = services
    track(services)  # closed at exit before the embedded database stops (flask commands, dev server)
    return services


def init_routes(app: OpenAPI, settings: Settings) -> None:
    from apps.core.metrics import init_metrics
    from apps.core.routes import core_bp, register_doc_routes
    from apps.routes import register_apps

    app.register_api(core_bp)
    register_doc_routes(app)
    init_metrics(app)
    app.config["APPS_MOUNTED"] = register_apps(app, settings.ROOT_APP)


def init_indexes(app: OpenAPI) -> None:
    """Every index of the core and of every app, from one explicit list (no import-order dependence):
    each process (every gunicorn worker) creates them all at start."""
    from apps.indexes import create_all_indexes

    create_all_indexes(app.extensions["services"].db)


def init_cli(app: OpenAPI) -> None:
    from agent.prompts_cli import register as register_prompts
    from apps.core.auth import register_cli as register_users
    from apps.core.export import register_cli as register_export

    register_prompts(app)
    register_users(app)
    register_export(app)


_app: OpenAPI | None = None


def __getattr__(name: str) -> Any:
    """`app` is created on first access (gunicorn's `app:app`), not at import."""
    global _app
    if name == "app":
        if _app is None:
            with exit_on_config_error():  # worker or `flask --app app`: one line per bad key, no traceback
                _app = create_app()
        return _app
    raise AttributeError(name)


if __name__ == "__main__":
    with exit_on_config_error():
        settings = load_settings()
        application = create_app()
    application.run(host=settings.HOST, port=settings.PORT, threaded=True, use_reloader=False)
