"""Who is calling: AUTH_MODE none | basic | apikey.

`none` (a local study): requests are anonymous and data is scoped by the usernames
the frontends send. `basic`: HTTP Basic against users created with `flask users
create` (scrypt-hashed passwords), or the single BASIC_AUTH_USERNAME/PASSWORD pair
(the storybook original's credentials). `apikey`: `X-API-Key: <key>` or
`Authorization: Bearer <key>`; keys are stored hashed (sha256 of a random 32-byte
token). When auth is on, a user sees only their own data; role `admin` sees all.

Browsers' `EventSource` cannot send headers, so SSE URLs may carry `?token=`: a
stream token from `POST /auth/stream-token {job_id}`, an HMAC-SHA256 (SECRET_KEY, or
a random secret kept in MongoDB and shared by every worker and host when SECRET_KEY
is unset) over the user, role, job id and expiry (STREAM_TOKEN_TTL_S). It is accepted
only on the GET routes marked `@stream_token_route` (a job's status and stream) whose job
parameter is the token's job, and only when no other credentials are sent; it is checked
when a stream opens, so an open stream outlives it. `GET /auth/me` tells a frontend who it is.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import click
from cachetools import TTLCache
from flask import Flask, Response, current_app, g, jsonify, request
from flask_openapi3 import APIBlueprint, Tag
from pydantic import BaseModel, ConfigDict, Field
from pymongo.database import Database
from pymongo.errors import DuplicateKeyError

from .context import services
from .errors import ApiError
from .openapi import PROTECTED, body_example


@dataclass(frozen=True)
class User:
    name: str
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


def create_indexes(db: Database) -> None:
    db.users_auth.create_index("name", unique=True)
    db.users_auth.create_index("key_hashes")


def _hash_password(password: str, salt: bytes | None = None) -> str:
    salt = salt or secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=2**14, r=8, p=1, dklen=32)
    return f"scrypt${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def _check_password(password: str, stored: str) -> bool:
    try:
        _, salt_b64, digest_b64 = stored.split("$")
    except ValueError:
        return False
    expected = _hash_password(password, base64.b64decode(salt_b64))
    return hmac.compare_digest(expected.split("$")[2], digest_b64)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class UserExists(Exception):
    """`create` on a name that already exists: rotating keys must be asked for explicitly."""


class UnknownUser(LookupError):
    """rotate/revoke of a name that does not exist."""


def _new_key() -> str:
    return "csk_" + secrets.token_urlsafe(32)


def create_user(
    db: Database, name: str, *, role: str = "user", password: str | None = None, rotate: bool = False
) -> str:
    """Create a user; returns its API key (shown once; only its hash is stored).

    An existing name raises UserExists unless `rotate`: then its keys are replaced by the new one
    (and its role/password updated), so re-running never leaves a second valid key behind.
    """
    key = _new_key()
    now = datetime.now(UTC)
    fields: dict[str, Any] = {"role": role, "updated_at": now, "key_hashes": [hash_key(key)]}
    if password:
        fields["password"] = _hash_password(password)
    if not rotate:
        try:
            db.users_auth.insert_one({"name": name, "created_at": now, **fields})
        except DuplicateKeyError as exc:
            raise UserExists(name) from exc
        return key
    result = db.users_auth.update_one({"name": name}, {"$set": fields})
    if result.matched_count == 0:
        raise UnknownUser(name)
    return key


def rotate_key(db: Database, name: str) -> str:
    """Replace every API key of `name` by one new key (role and password unchanged)."""
    key = _new_key()
    result = db.users_auth.update_one(
        {"name": name}, {"$set": {"key_hashes": [hash_key(key)], "updated_at": datetime.now(UTC)}}
    )
    if result.matched_count == 0:
        raise UnknownUser(name)
    return key


def revoke_user(db: Database, name: str) -> bool:
    """Delete a user: its keys and password stop working at once (the Basic-auth cache is keyed by the hash)."""
    return db.users_auth.delete_one({"name": name}).deleted_count == 1


def list_users(db: Database) -> list[dict[str, Any]]:
    """Name, role, key count, password set, dates: never a hash."""
    out = []
    for doc in db.users_auth.find({}, sort=[("name", 1)]):
        out.append(
            {
                "name": doc["name"],
                "role": doc.get("role", "user"),
                "keys": len(doc.get("key_hashes") or []),
                "password": bool(doc.get("password")),
                "created_at": doc.get("created_at"),
                "updated_at": doc.get("updated_at"),
            }
        )
    return out


def _unauthorized(message: str, *, basic: bool) -> ApiError:
    headers = {"WWW-Authenticate": 'Basic realm="creativity-server"'} if basic else {}
    return ApiError(401, message, headers=headers)


def authenticate() -> User | None:
    """Resolve the caller for this request (cached on `g`). Raises 401 when auth is on and fails."""
    if "auth_user" in g:
        return g.auth_user
    settings = services().settings
    user: User | None = None
    if settings.AUTH_MODE != "none" and _stream_token_request():
        user = _token_user()
    elif settings.AUTH_MODE == "basic":
        user = _basic_user()
    elif settings.AUTH_MODE == "apikey":
        user = _apikey_user()
    g.auth_user = user
    return user


def _stream_token_request() -> bool:
    """A GET carrying `?token=` and no other credentials (headers always win)."""
    return (
        request.method in ("GET", "HEAD")
        and bool(request.args.get(TOKEN_PARAM))
        and not request.headers.get("Authorization")
        and not request.headers.get("X-API-Key")
    )


def _basic_user() -> User:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        raise _unauthorized("Not authenticated", basic=True)
    settings = services().settings
    name, password = auth.username or "", auth.password or ""
    if settings.BASIC_AUTH_USERNAME and settings.BASIC_AUTH_PASSWORD:
        if hmac.compare_digest(name.encode(), settings.BASIC_AUTH_USERNAME.encode()) and hmac.compare_digest(
            password.encode(), settings.BASIC_AUTH_PASSWORD.encode()
        ):
            return User(name=name, role="admin")
    doc = services().db.users_auth.find_one({"name": name})
    stored = doc.get("password") if doc else None
    if stored:
        cache_key = hashlib.sha256(f"{name}\0{password}\0{stored}".encode()).digest()
        if _verified_recently(cache_key) or _check_password(password, stored):
            _remember_verified(cache_key)
            return User(name=name, role=doc.get("role", "user"))
    else:
        # an unknown user (or one without a password) costs the same scrypt as a wrong password,
        # so the answer's timing does not tell which user names exist
        _check_password(password, _dummy_hash())
    raise _unauthorized("Incorrect username or password", basic=True)


@functools.cache
def _dummy_hash() -> str:
    return _hash_password(secrets.token_urlsafe(16))


# scrypt costs tens of milliseconds of CPU on purpose; browsers resend Basic credentials with every
# request (images, streams), so a successful check is remembered briefly. The key covers the stored
# hash too: a password change or a deleted user invalidates it at once.
_VERIFIED: TTLCache[bytes, bool] = TTLCache(maxsize=1024, ttl=60.0)
_VERIFIED_LOCK = threading.Lock()  # cachetools' caches are not thread-safe


def _verified_recently(key: bytes) -> bool:
    with _VERIFIED_LOCK:
        return _VERIFIED.get(key, False)


def _remember_verified(key: bytes) -> None:
    with _VERIFIED_LOCK:
        _VERIFIED[key] = True


def _apikey_user() -> User:
    key = request.headers.get("X-API-Key")
    auth = request.headers.get("Authorization", "")
    if not key and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    if not key:
        raise _unauthorized("Not authenticated: send X-API-Key or Authorization: Bearer <key>", basic=False)
    doc = services().db.users_auth.find_one({"key_hashes": hash_key(key)})
    if not doc:
        raise _unauthorized("Invalid API key", basic=False)
    return User(name=doc["name"], role=doc.get("role", "user"))


# ---------------------------------------------------------------- stream tokens

TOKEN_PARAM = "token"
_TOKEN_CONTEXT = b"creativity-stream-token.v1."


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def token_secret(db: Database, configured: str | None) -> bytes:
    """SECRET_KEY, else one random secret stored in MongoDB (the same for every worker and host)."""
    if configured:
        return configured.encode()
    cache = current_app.extensions.setdefault("auth_secret", {})
    if "value" not in cache:
        doc = db.server_secrets.find_one({"_id": "stream_token"})
        if doc is None:
            try:
                db.server_secrets.insert_one(
                    {"_id": "stream_token", "value": secrets.token_hex(32), "created_at": datetime.now(UTC)}
                )
            except DuplicateKeyError:  # another worker created it first
                pass
            doc = db.server_secrets.find_one({"_id": "stream_token"})
        cache["value"] = doc["value"].encode()
    return cache["value"]


def _sign(secret: bytes, body: str) -> str:
    return _b64(hmac.new(secret, _TOKEN_CONTEXT + body.encode(), hashlib.sha256).digest())


def make_stream_token(
    secret: bytes, user: User | None, job_id: str, ttl_s: int, now: float | None = None
) -> tuple[str, int]:
    """A signed token for one job's streams; returns (token, expiry as a UNIX time)."""
    expires = int((now if now is not None else time.time()) + ttl_s)
    payload = {
        "u": user.name if user else None,
        "r": user.role if user else None,
        "j": job_id,
        "exp": expires,
    }
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_sign(secret, body)}", expires


def read_stream_token(secret: bytes, token: str, now: float | None = None) -> dict[str, Any] | None:
    """The payload of a valid, unexpired token, else None."""
    body, _, signature = token.partition(".")
    if not body or not signature or not hmac.compare_digest(_sign(secret, body), signature):
        return None
    try:
        payload = json.loads(_unb64(body))
    except ValueError:
        return None
    if not isinstance(payload, dict) or not isinstance(payload.get("exp"), int):
        return None
    if payload["exp"] < (now if now is not None else time.time()):
        return None
    return payload


# view function (module.qualname) -> the path parameter that names its job; only these accept a token
_TOKEN_ROUTES: dict[str, str] = {}

F = TypeVar("F", bound=Callable[..., Any])


def stream_token_route(job_param: str) -> Callable[[F], F]:
    """Mark a GET view (a job's stream or status) as one a stream token for `<job_param>` may open.

    Put it under the route decorator. Explicit on purpose: a token must open only its job's
    stream and status, never a route that merely mentions the id somewhere in its URL.
    """

    def mark(view: F) -> F:
        _TOKEN_ROUTES[f"{view.__module__}.{view.__qualname__}"] = job_param
        return view

    return mark


def token_scope_ok(
    payload: dict[str, Any], view: Callable[..., Any] | None, view_args: dict[str, Any] | None
) -> bool:
    """May this token open this route? Only a marked route whose job parameter is the token's job.

    (The one place a token's scope is decided; a second token kind adds its own check here.)
    """
    if view is None:
        return False
    param = _TOKEN_ROUTES.get(f"{view.__module__}.{view.__qualname__}")
    if param is None:
        return False
    job = (view_args or {}).get(param)
    return (
        isinstance(payload.get("j"), str) and job is not None and hmac.compare_digest(str(job), payload["j"])
    )


def _token_user() -> User:
    svc = services()
    payload = read_stream_token(
        token_secret(svc.db, svc.settings.SECRET_KEY), request.args.get(TOKEN_PARAM, "")
    )
    if payload is None or not payload.get("u"):
        raise _unauthorized(
            "invalid or expired stream token; ask POST /auth/stream-token for a new one", basic=False
        )
    if payload.get("k") is not None:  # a token of another scope kind (make_scoped_token)
        return _scoped_token_user(payload)
    view = current_app.view_functions.get(request.endpoint or "")
    if not token_scope_ok(payload, view, request.view_args):
        raise _unauthorized("this stream token opens only its job's stream and status", basic=False)
    return User(name=str(payload["u"]), role=str(payload.get("r") or "user"))


# Scoped tokens: the same signed `?token=` for streams that are not jobs (a storyteller session's SSE
# and WebSocket). The payload names a kind (`k`) and the one thing it opens (`s`); the kind's
# registered check decides whether *this* request is one of that thing's streams. A job token has
# no `k` and a scoped token no `j`, so neither opens the other's streams.
ScopeCheck = Callable[[str], bool]
_SCOPE_CHECKS: dict[str, ScopeCheck] = {}


def register_token_scope(kind: str, check: ScopeCheck) -> None:
    """`check(scope_id)` is True when the current request is a stream of that scope (and nothing else)."""
    _SCOPE_CHECKS[kind] = check


def make_scoped_token(
    secret: bytes, user: User | None, kind: str, scope_id: str, ttl_s: int, now: float | None = None
) -> tuple[str, int]:
    """A signed token that opens only the streams of one `scope_id` of `kind`; (token, expiry)."""
    expires = int((now if now is not None else time.time()) + ttl_s)
    payload = {
        "u": user.name if user else None,
        "r": user.role if user else None,
        "k": kind,
        "s": scope_id,
        "exp": expires,
    }
    body = _b64(json.dumps(payload, separators=(",", ":")).encode())
    return f"{body}.{_sign(secret, body)}", expires


def _scoped_token_user(payload: dict[str, Any]) -> User:
    check = _SCOPE_CHECKS.get(str(payload.get("k")))
    scope_id = payload.get("s")
    if check is None or not isinstance(scope_id, str) or not scope_id or not check(scope_id):
        raise _unauthorized("this stream token is for another stream", basic=False)
    return User(name=str(payload["u"]), role=str(payload.get("r") or "user"))


def current_user_name(fallback: str | None = None) -> str | None:
    """The authenticated user's name, or (auth off) the name the request carries."""
    user = authenticate()
    return user.name if user else fallback


def check_owner(owner: str | None, message: str = "not found") -> None:
    """404 (not 403: don't confirm it exists) when auth is on and the caller does not own it.

    `message` must be the one the caller answers for a missing object of the same kind, so the two
    404 bodies are identical (no existence oracle).
    """
    user = authenticate()
    if user is None or user.is_admin:
        return
    if owner != user.name:
        raise ApiError(404, message)


# ---------------------------------------------------------------- routes

auth_bp = APIBlueprint(
    "auth",
    __name__,
    url_prefix="/auth",
    abp_tags=[Tag(name="auth", description="Who am I; stream tokens for EventSource URLs")],
    abp_security=PROTECTED,
)


class Me(BaseModel):
    auth_mode: str
    authenticated: bool
    user: str | None = None
    role: str | None = None


class StreamTokenBody(BaseModel):
    model_config = ConfigDict(**body_example({"job_id": "Qm9va0V4YW1wbGUx"}))

    job_id: str = Field(
        min_length=8,
        max_length=64,
        pattern=r"^[A-Za-z0-9_-]+$",
        description="the job (or storybook book) to stream",
    )


class StreamToken(BaseModel):
    token: str
    job_id: str
    expires_at: str
    expires_in: int
    stream_url: str = Field(description="server-relative SSE URL of the job with the token")


@auth_bp.get("/me", responses={200: Me})
def me() -> Response:
    """The caller as the server sees it (auth off: anonymous)."""
    user = authenticate()
    mode = services().settings.AUTH_MODE
    return jsonify(
        {
            "auth_mode": mode,
            "authenticated": user is not None,
            "user": user.name if user else None,
            "role": user.role if user else None,
        }
    )


@auth_bp.post("/stream-token", responses={200: StreamToken})
def stream_token(body: StreamTokenBody) -> Response:
    """A short-lived `?token=` for a job's SSE URLs (EventSource cannot send headers)."""
    svc = services()
    user = authenticate()
    job = svc.jobs.get(body.job_id)
    if job is None:
        raise ApiError(404, f"no job {body.job_id}")
    check_owner(job.get("owner"), f"no job {body.job_id}")
    ttl = svc.settings.STREAM_TOKEN_TTL_S
    token, expires = make_stream_token(token_secret(svc.db, svc.settings.SECRET_KEY), user, body.job_id, ttl)
    return jsonify(
        {
            "token": token,
            "job_id": body.job_id,
            "expires_in": ttl,
            "expires_at": datetime.fromtimestamp(expires, UTC).isoformat(),
            "stream_url": f"/jobs/{body.job_id}/events?{TOKEN_PARAM}={token}",
        }
    )


def init_auth(app: Any) -> None:
    """Register /auth/me and /auth/stream-token (the users' indexes are in apps/indexes.py)."""
    app.register_api(auth_bp)
    # document how to authenticate (and keep `components.securitySchemes` an object, as OpenAPI requires)
    app.security_schemes = {
        "basic": {"type": "http", "scheme": "basic", "description": "AUTH_MODE=basic"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key", "description": "AUTH_MODE=apikey"},
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "AUTH_MODE=apikey: the key as a bearer token",
        },
        "streamToken": {
            "type": "apiKey",
            "in": "query",
            "name": TOKEN_PARAM,
            "description": "GET of a job's URLs only: POST /auth/stream-token",
        },
    }


def register_cli(app: Flask) -> None:
    @app.cli.group("users")
    def users() -> None:
        """Manage users for AUTH_MODE=basic|apikey: create, list, rotate, revoke."""

    @users.command("create")
    @click.argument("name")
    @click.option("--role", type=click.Choice(["user", "admin"]), default="user")
    @click.option("--password", default=None, help="for AUTH_MODE=basic")
    @click.option("--rotate", is_flag=True, help="the user exists: replace its keys (and role/password)")
    def create(name: str, role: str, password: str | None, rotate: bool) -> None:
        """Create a user and print its API key once."""
        try:
            key = create_user(services().db, name, role=role, password=password, rotate=rotate)
        except UserExists as exc:
            raise click.ClickException(
                f"user {name} already exists; its key was not changed. Use `flask users rotate {name}` "
                f"for a new key (the old one stops working) or `create --rotate` to also reset role/password"
            ) from exc
        except UnknownUser as exc:
            raise click.ClickException(f"no user {name} to rotate") from exc
        click.echo(f"user {name} ({role}) ready; API key (shown once): {key}")

    @users.command("list")
    def list_() -> None:
        """Users, roles and how many keys each has (never the keys)."""
        for u in list_users(services().db):
            created = u["created_at"].strftime("%Y-%m-%d") if u["created_at"] else "-"
            click.echo(
                f"{u['name']}\t{u['role']}\tkeys={u['keys']}\tpassword={'yes' if u['password'] else 'no'}"
                f"\tcreated={created}"
            )

    @users.command("rotate")
    @click.argument("name")
    def rotate(name: str) -> None:
        """Replace a user's API keys by one new key (the old keys stop working at once)."""
        try:
            key = rotate_key(services().db, name)
        except UnknownUser as exc:
            raise click.ClickException(f"no user {name}") from exc
        click.echo(f"user {name}: new API key (shown once): {key}")

    @users.command("revoke")
    @click.argument("name")
    def revoke(name: str) -> None:
        """Delete a user: every key and the password stop working at once."""
        if not revoke_user(services().db, name):
            raise click.ClickException(f"no user {name}")
        click.echo(f"user {name} revoked")
