"""Per-caller rate limits (Flask-Limiter), counted in MongoDB so every worker and host shares them.

Two shared buckets per caller, where the caller is the authenticated user (auth on)
or the client IP (auth off; behind a proxy set PROXY_FIX_X_FOR so the IP is the
client's, not the proxy's):

- `RATE_LIMIT_DEFAULT` (e.g. 600/minute) over every request, whatever the route;
- `RATE_LIMIT_GENERATE` (e.g. 60/minute) over the requests that start model work
  (`is_generation_request`), on top of the default bucket.

Health, liveness, metrics, docs and CORS preflights are exempt, so probes and
scrapers never eat a user's budget. A breach answers 429 through the one error
builder (`error_response`: plain JSON, or the envelope for the envelope apps) with
`Retry-After` in seconds. The counters live in `ratelimit_counters` /
`ratelimit_windows` of the app's database (TTL-expired); increments are batched per
process (apps/core/ratelimit_store.py, `RATE_LIMIT_BATCH_S`). If the store is down the
limiter lets requests through (the route itself then fails with a clean 503) rather
than turning a database blip into a wall of 429s or 500s.

The per-user daily model-call cap is separate (apps/core/spend.py) and is checked
for the same generation requests.
"""

from __future__ import annotations

import logging
import math
import time

from flask import Flask, Response, request
from flask_limiter import ApplicationLimit, Limiter, RequestLimit
from flask_limiter.errors import RateLimitExceeded
from limits import parse_many
from pymongo.errors import PyMongoError
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Settings

from .auth import authenticate
from .db import resolve_mongo_uri
from .errors import ApiError, error_response
from .ratelimit_store import SCHEME_PREFIX  # registers the batched storage
from .spend import init_spend_cap

log = logging.getLogger(__name__)

EXEMPT_PATHS = ("/ping", "/health", "/metrics", "/openapi.json", "/favicon.ico")
EXEMPT_PREFIXES = ("/docs",)
# app name -> (method, path relative to the app's mount) rules for "starts model work"
_GENERATION_PREFIX_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    "storybook": (("POST", "/"), ("GET", "/get_storybook")),
    "ideation": (("POST", "/generate"),),
    "refinement": (("POST", "/generate"), ("POST", "/refine/")),
    "storyteller": (("POST", "/"), ("GET", "/stream"), ("GET", "/ws")),
}


def client_key() -> str:
    """`user:<name>` when the request authenticates, else `ip:<address>`."""
    try:
        user = authenticate()
    except (ApiError, PyMongoError):  # bad credentials or no database: the route will answer 401/503
        user = None
    if user is not None:
        return f"user:{user.name}"
    return f"ip:{request.remote_addr or '-'}"


def _app_and_path() -> tuple[str | None, str]:
    """Which app a request is for and its path inside that app's mount."""
    blueprint = (request.blueprint or "").split(".")[0]
    path = request.path
    for name in _GENERATION_PREFIX_RULES:
        if blueprint in (f"{name}_root", f"{name}_ws_root"):
            return name, path
        prefix = f"/{name}"
        if path == prefix or path.startswith(prefix + "/"):
            return name, path[len(prefix) :] or "/"
    return None, path


def is_generation_request() -> bool:
    """True for the requests that start model work (the stricter bucket and the daily cap)."""
    app_name, path = _app_and_path()
    if app_name is None:
        return False
    for method, rule in _GENERATION_PREFIX_RULES[app_name]:
        if request.method != method:
            continue
        if rule.endswith("/") and path.startswith(rule):
            return True
        if path == rule or path.rstrip("/") == rule:
            return True
    return False


def is_exempt() -> bool:
    if request.method == "OPTIONS":
        return True
    path = request.path
    return path in EXEMPT_PATHS or path.startswith(EXEMPT_PREFIXES)


def _retry_after(limit: RequestLimit | None) -> int:
    if limit is None:
        return 1
    try:
        return max(1, math.ceil(limit.window[0] - time.time()))
    except Exception:  # noqa: BLE001 - the store went away between the breach and the answer
        return max(1, int(limit.limit.get_expiry()))


def _breach_response(limit: RequestLimit | None) -> Response:
    seconds = _retry_after(limit)
    what = "generation requests" if limit is not None and "generate" in limit.request_args else "requests"
    amount = str(limit.limit) if limit is not None else "the limit"
    return error_response(
        429,
        f"too many {what} ({amount}); retry in {seconds} s",
        code="rate_limited",
        headers={"Retry-After": str(seconds)},
    )


def _storage_uri(settings: Settings) -> str:
    if settings.RATE_LIMIT_STORAGE_URI:
        return settings.RATE_LIMIT_STORAGE_URI

    return resolve_mongo_uri(settings)


def init_ratelimit(app: Flask, settings: Settings) -> Limiter | None:
    """Install the limiter (when enabled) and the daily model-call cap."""
    if settings.PROXY_FIX_X_FOR > 0:
        app.wsgi_app = ProxyFix(
            app.wsgi_app,
            x_for=settings.PROXY_FIX_X_FOR,  # type: ignore[method-assign]
            x_proto=settings.PROXY_FIX_X_FOR,
            x_host=settings.PROXY_FIX_X_FOR,
        )
    limiter: Limiter | None = None
    if settings.RATE_LIMIT_ENABLED:
        for value in (settings.RATE_LIMIT_DEFAULT, settings.RATE_LIMIT_GENERATE):
            parse_many(value)  # a typo is a start-up error, not a silent "no limit"
        uri = _storage_uri(settings)
        options: dict = {}
        if uri.startswith(("mongodb://", "mongodb+srv://")):
            if settings.RATE_LIMIT_BATCH_S > 0 and settings.RATE_LIMIT_STRATEGY == "fixed-window":
                uri = SCHEME_PREFIX + uri
            options = {
                "database_name": settings.MONGO_DB,
                "counter_collection_name": "ratelimit_counters",
                "window_collection_name": "ratelimit_windows",
                # fail fast when the database is away: the request goes on and gets its own clean 503
                "serverSelectionTimeoutMS": 1500,
                "connectTimeoutMS": 1500,
                "socketTimeoutMS": 5000,
                "appname": "creativity-ratelimit",
                # a counter write lost or repeated in a network error only moves a limit by a hit (the
                # embedded server's URI turns them off for everyone: apps/core/embedded_mongo.py)
                "retryWrites": False,
            }
            if uri.startswith("batched+"):
                options["flush_s"] = settings.RATE_LIMIT_BATCH_S
        limiter = Limiter(
            client_key,
            app=app,
            application_limits=[
                ApplicationLimit(settings.RATE_LIMIT_DEFAULT, scope="all", exempt_when=is_exempt),
                ApplicationLimit(
                    settings.RATE_LIMIT_GENERATE,
                    scope="generate",
                    exempt_when=lambda: is_exempt() or not is_generation_request(),
                ),
            ],
            storage_uri=uri,
            storage_options=options,
            strategy=settings.RATE_LIMIT_STRATEGY,
            headers_enabled=False,  # each X-RateLimit header set costs a store read per request
            swallow_errors=True,
            key_prefix="rl",
            on_breach=_breach_response,
        )

        storage = limiter.storage
        if hasattr(storage, "counters"):
            # connect now: the limits library's MongoDB storage connects lazily, and its __del__ would
            # otherwise connect (and create its TTL indexes) while the process is tearing down
            client = storage.storage  # type: ignore[attr-defined]
            services = app.extensions.get("services")
            if services is not None:  # closed with the app's other connections (no hang at exit)
                services.closers.append(getattr(storage, "close", client.close))

        @app.errorhandler(RateLimitExceeded)
        def _rate_limited(exc: RateLimitExceeded) -> Response:
            if exc.response is not None:
                return exc.response
            return _breach_response(limiter.current_limit if limiter else None)

        app.extensions["creativity_limiter"] = limiter
    init_spend_cap(app, settings, is_generation_request)
    return limiter
