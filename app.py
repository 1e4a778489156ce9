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

from agent.prompts.cli import register_cli as register_prompts_cli
from apps import ideation, refinement, storybook, storyteller
from apps.core.auth import init_auth
from apps.core.auth import register_cli as register_users_cli
from apps.core.errors import register_error_handlers, validation_error_response
from apps.core.export import register_cli as register_export_cli
from apps.core.indexes import create_core_indexes
from apps.core.logs import configure_logging
from apps.core.metrics import init_metrics
from apps.core.openapi import init_openapi
from apps.core.ratelimit import init_ratelimit
from apps.core.resilience import init_resilience
from apps.core.routes import core_bp, register_doc_routes
from apps.core.screening import init_screening
from apps.core.services import build_services
from apps.core.studies import init_studies
from config import Settings, exit_on_config_error, load_settings

log = logging.getLogger(__name__)

# The apps, each a package with `init_app(app, services)`: blueprint, indexes, export collections, CLI.
APPS = (storybook, ideation, refinement, storyteller)


def create_app(test_config: dict[str, Any] | None = None) -> OpenAPI:
    """Start-up in one visible order; each step is one call."""
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
    configure_logging(app, settings)
    register_error_handlers(app)
    init_screening(app)  # hostile-input screening of every body, before any route reads it
    init_resilience(app)
    init_cors(app, settings)
    services = build_services(settings)
    app.extensions["services"] = services
    create_core_indexes(services.db)
    app.register_api(core_bp)
    register_doc_routes(app)
    init_metrics(app)
    app.config["APPS_MOUNTED"] = []
    for package in APPS:
        package.init_app(app, services)
    init_auth(app)
    init_openapi(app, settings.AUTH_MODE)  # /openapi.json for this AUTH_MODE
    init_ratelimit(app, settings)
    register_prompts_cli(app)
    register_users_cli(app)
    register_export_cli(app)
    init_studies(
        app, services
    )  # STUDY conditions, cost per call, model metrics, /dashboard/, `flask study|calls`
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
    app.validation_error_callback = validation_error_response


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
