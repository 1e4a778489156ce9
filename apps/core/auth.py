"""Who is calling: AUTH_MODE none | basic | apikey.

`none` (a local study): requests are anonymous and data is scoped by the usernames
the frontends send. `basic`: HTTP Basic against users created with `flask users
create` (scrypt-hashed passwords), or the single BASIC_AUTH_USERNAME/PASSWORD pair
(the storybook original's credentials). `apikey`: `X-API-Key: <key>` or
`Authorization: Bearer <key>`; keys are stored hashed (sha256 of a random 32-byte
token). When auth is on, a user sees only their own data; role `admin` sees all.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

import click
from flask import Flask, g, request
from pymongo.database import Database

from .context import services
from .db import register_indexes
from .errors import ApiError


@dataclass(frozen=True)
class User:
    name: str
    role: str = "user"

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


@register_indexes
def _indexes(db: Database) -> None:
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


def create_user(db: Database, name: str, *, role: str = "user", password: str | None = None) -> str:
    """Create (or update) a user; returns a new API key (shown once)."""
    key = "csk_" + secrets.token_urlsafe(32)
    update = {"$set": {"role": role, "updated_at": datetime.now(UTC)}, "$addToSet": {"key_hashes": hash_key(key)},
              "$setOnInsert": {"created_at": datetime.now(UTC)}}
    if password:
        update["$set"]["password"] = _hash_password(password)
    db.users_auth.update_one({"name": name}, update, upsert=True)
    return key


def _unauthorized(message: str, *, basic: bool) -> ApiError:
    headers = {"WWW-Authenticate": 'Basic realm="creativity-server"'} if basic else {}
    return ApiError(401, message, headers=headers)


def authenticate() -> User | None:
    """Resolve the caller for this request (cached on `g`). Raises 401 when auth is on and fails."""
    if "auth_user" in g:
        return g.auth_user
    settings = services().settings
    user: User | None = None
    if settings.AUTH_MODE == "basic":
        user = _basic_user()
    elif settings.AUTH_MODE == "apikey":
        user = _apikey_user()
    g.auth_user = user
    return user


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
    if doc and doc.get("password") and _check_password(password, doc["password"]):
        return User(name=name, role=doc.get("role", "user"))
    raise _unauthorized("Incorrect username or password", basic=True)


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


def current_user_name(fallback: str | None = None) -> str | None:
    """The authenticated user's name, or (auth off) the name the request carries."""
    user = authenticate()
    return user.name if user else fallback


def check_owner(owner: str | None) -> None:
    """404 (not 403: don't confirm it exists) when auth is on and the caller does not own it."""
    user = authenticate()
    if user is None or user.is_admin:
        return
    if owner != user.name:
        raise ApiError(404, "not found")


def register_cli(app: Flask) -> None:
    @app.cli.group("users")
    def users() -> None:
        """Manage users for AUTH_MODE=basic|apikey."""

    @users.command("create")
    @click.argument("name")
    @click.option("--role", type=click.Choice(["user", "admin"]), default="user")
    @click.option("--password", default=None, help="for AUTH_MODE=basic")
    def create(name: str, role: str, password: str | None) -> None:
        key = create_user(services().db, name, role=role, password=password)
        click.echo(f"user {name} ({role}) ready; API key (shown once): {key}")
