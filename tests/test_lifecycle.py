"""Process lifecycle with real processes: indexes in a fresh process, `flask` commands that exit.

Each test runs the server code in a subprocess (a fresh interpreter, like a gunicorn worker or a
`flask` command), because the bugs it guards against only show in a fresh process: index functions
that register on import, and exit-time ordering of client closes and the embedded database's stop.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow

UNIQUE = {  # (collection, key) of every unique index a fresh process must have
    ("ideation_users", "username"),
    ("refinement_users", "username"),
    ("storyteller_feedback", "version"),
    ("storybooks", "legacy_id"),
    ("users_auth", "name"),
}


def _clean_env(**extra: str) -> dict[str, str]:
    """The environment of a fresh process: none of the developer's database or model settings."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("MONGO_URI", "MONGO_DB", "DATA_DIR", "PROMETHEUS_MULTIPROC_DIR", "EMBEDDED_MONGO")
    }
    env["PYTHONPATH"] = str(ROOT)
    env.update(extra)
    return env


def _index_map(db: Any) -> dict[str, dict[str, dict[str, Any]]]:
    """collection -> index name -> index info, for every collection of `db`."""
    return {name: db[name].index_information() for name in db.list_collection_names()}


def test_every_registered_index_function_is_listed() -> None:
    """A module that marks an index function with @register_indexes but is missing from the list fails."""
    import importlib

    from apps.core.db import registered_index_functions
    from apps.indexes import index_functions
    from apps.routes import PREFIXES

    for name in PREFIXES:
        importlib.import_module(f"apps.{name}.routes")
    importlib.import_module("apps.core.ratelimit")
    missing = [
        f"{fn.__module__}.{fn.__qualname__}"
        for fn in registered_index_functions()
        if fn not in index_functions()
    ]
    assert missing == []


def test_fresh_process_creates_every_index(
    mongo_uri: str, mongo_client: MongoClient, fake_openai: Any, tmp_path: Path
) -> None:
    """One create_app in a fresh interpreter (what each gunicorn worker does) creates every index of
    the core and of every app, unique ones included: the same set as the full list creates."""
    fresh, reference = "t_" + secrets.token_hex(6), "t_" + secrets.token_hex(6)
    script = textwrap.dedent("""
        from app import create_app
        create_app().extensions["services"].close()
    """)
    env = _clean_env(
        MONGO_URI=mongo_uri,
        MONGO_DB=fresh,
        DATA_DIR=str(tmp_path / "data"),
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", script], cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        from apps.indexes import create_all_indexes

        create_all_indexes(mongo_client[reference])
        got, want = _index_map(mongo_client[fresh]), _index_map(mongo_client[reference])
        for coll, indexes in want.items():
            assert set(got.get(coll, {})) >= set(indexes), (
                f"{coll}: missing {set(indexes) - set(got.get(coll, {}))}"
            )
        for coll, key in UNIQUE:
            unique = [info for info in got[coll].values() if info.get("unique") and info["key"][0][0] == key]
            assert unique, f"no unique index on {coll}.{key}: {got[coll]}"
        assert any(
            info["key"] == [("user", 1), ("created_at", -1)] for info in got["generations"].values()
        ), "the daily-cap index on generations is missing"
        apps_collections = {c for c in got if c.split("_")[0] in ("ideation", "refinement", "storyteller")}
        assert len(apps_collections) >= 8, sorted(got)
    finally:
        mongo_client.drop_database(fresh)
        mongo_client.drop_database(reference)


# ---------------------------------------------------------------------------------------- flask CLI
CLI_COMMANDS = {
    "prompts": ["prompts", "list"],
    "users": ["users", "create", "alice"],
    "export": ["export", "--app", "storybook", "--out", "{out}"],
}
CLI_DEADLINE_S = 30.0  # a hang fails well before pytest's own timeout
CLI_MAX_S = 15.0  # start-up (embedded DB, app) + the work + exit; the exit itself must be quick


def _run_flask(args: list[str], data_dir: Path, out: Path) -> tuple[subprocess.CompletedProcess, float]:
    argv = [a.replace("{out}", str(out)) for a in args]
    env = _clean_env(DATA_DIR=str(data_dir))
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "flask", "--app", "app", *argv],
        cwd=str(ROOT),
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_DEADLINE_S,
    )
    return proc, time.monotonic() - started


def _assert_clean(proc: subprocess.CompletedProcess, took: float) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Exception ignored" not in proc.stderr, proc.stderr[-3000:]
    assert took < CLI_MAX_S, f"took {took:.1f}s"


@pytest.fixture
def running_db(tmp_path: Path) -> Iterator[Path]:
    """A DATA_DIR whose embedded database is already running (a server on this host holds it)."""
    data_dir = tmp_path / "shared"
    server = ensure_embedded_mongo(data_dir)
    assert server.owner
    yield data_dir
    stop_embedded_mongo(data_dir)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_flask_command_exits_without_server(command: str, tmp_path: Path) -> None:
    """The command starts the embedded database itself, does its work, closes its clients, stops it."""
    data_dir = tmp_path / "data"
    proc, took = _run_flask(CLI_COMMANDS[command], data_dir, tmp_path / "out")
    _assert_clean(proc, took)
    assert not (data_dir / "embedded-mongo.json").exists(), "the database this command started still runs"
    if command == "users":
        assert "ready; API key" in proc.stdout


@pytest.mark.timeout(120)
@pytest.mark.parametrize("command", sorted(CLI_COMMANDS))
def test_flask_command_exits_with_server_running(command: str, running_db: Path, tmp_path: Path) -> None:
    """The command shares the running database and leaves it running."""
    state = (running_db / "embedded-mongo.json").read_text()
    proc, took = _run_flask(CLI_COMMANDS[command], running_db, tmp_path / "out")
    _assert_clean(proc, took)
    assert (running_db / "embedded-mongo.json").read_text() == state, "the shared database was stopped"
    if command == "export":
        assert (tmp_path / "out").is_dir()
