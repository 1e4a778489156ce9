"""Process lifecycle with real processes: indexes in a fresh process, `flask` commands that exit.

Each test runs the server code in a subprocess (a fresh interpreter, like a gunicorn worker or a
`flask` command), because the bugs it guards against only show in a fresh process: index functions
that register on import, and exit-time ordering of client closes and the embedded database's stop.
"""

from __future__ import annotations

import os
import secrets
import signal
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


def test_fresh_process_creates_every_index(
    mongo_uri: str, mongo_client: MongoClient, fake_openai: Any, tmp_path: Path, make_app: Any
) -> None:
    """One create_app in a fresh interpreter (what each gunicorn worker does) creates every index of
    the core and of every app, unique ones included: the same set as an app built in this process (which
    has imported every module) creates."""
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
        make_app(
            MONGO_DB=reference, LLM_PROVIDER="openai", OPENAI_BASE_URL=fake_openai.url, OPENAI_API_KEY="k"
        )
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


# ---------------------------------------------------------------------------------- graceful shutdown
def _log(tmp_path: Path, base: str) -> str:
    """The gunicorn_server fixture's log of the server at `base`."""
    return (tmp_path / f"gunicorn-{base.rsplit(':', 1)[1]}.log").read_text()


@pytest.mark.timeout(180)
def test_sigterm_mid_book_loses_nothing(
    gunicorn_server: Any,
    fake_openai: Any,
    fake_sd: Any,
    mongo_client: MongoClient,
    db_name: str,
    tmp_path: Path,
) -> None:
    """SIGTERM to the master while a book's pictures are being drawn: the job ends failed/shutdown (it
    cannot finish inside the grace period), every picture the WebUI was asked for has its generation
    record, no SD instance stays leased, the worker exits inside graceful_timeout, and nothing in the
    log is a traceback."""
    from tests.test_faults import alive, gunicorn_pids, start_book, story_app_env, until

    graceful = 10
    fake_sd.delay = 4.0  # 3 pictures, one instance: ~12 s of drawing, more than the 5 s of grace
    env = story_app_env(
        fake_openai, IMAGE_PROVIDER="sdwebui", SD_INSTANCES=fake_sd.url, GRACEFUL_TIMEOUT=str(graceful)
    )
    base = gunicorn_server(workers=1, **env)
    db = mongo_client[db_name]
    book = start_book(base, pages=2)
    until(lambda: db.sd_instances.count_documents({"holder": {"$ne": None}}) > 0, 30, "a picture to be drawn")
    master, _ = gunicorn_pids(base)
    started = time.monotonic()
    os.kill(master, signal.SIGTERM)
    until(lambda: not alive(master), 40, "gunicorn to exit")
    took = time.monotonic() - started

    doc = db.jobs.find_one({"_id": book})
    assert doc["status"] == "failed" and doc["error"]["code"] == "shutdown", doc
    assert "shut down" in doc["error"]["message"]
    assert db.storybooks.find_one({"_id": book})["status"] == "failed"
    records = list(db.generations.find({"job": book, "kind": "image"}))
    asked = [(r["path"], r["status"], r.get("interrupted"), r["time"]) for r in fake_sd.generation_requests()]
    recorded = [(r.get("ok"), r.get("error"), r.get("step"), r["created_at"]) for r in records]
    drawn = [r for r in records if r.get("ok")]
    assert len(drawn) == len(asked) >= 1, (recorded, asked, _log(tmp_path, base)[-3000:])
    for refused in (r for r in records if not r.get("ok")):  # asked for a lease after the shutdown began
        assert "shutting down" in str(refused.get("error")), refused
    assert db.generations.count_documents({"job": book, "kind": {"$ne": "image"}}) >= 1  # the plan, pages
    held = list(db.sd_instances.find({"holder": {"$ne": None}}, {"holder": 1, "lease_until": 1}))
    assert held == [], f"SD instances still leased after shutdown: {held}"
    assert took < graceful + 5, f"shutdown took {took:.1f}s"
    log = _log(tmp_path, base)
    assert "Traceback" not in log, log[-5000:]
    assert "SIGKILL" not in log, log[-3000:]


@pytest.mark.timeout(180)
def test_sigterm_lets_a_short_book_finish(
    gunicorn_server: Any,
    fake_openai: Any,
    fake_sd: Any,
    mongo_client: MongoClient,
    db_name: str,
    tmp_path: Path,
) -> None:
    """A book that fits in the grace period finishes `done` during the drain, with every record."""
    from tests.test_faults import alive, gunicorn_pids, start_book, story_app_env, until

    fake_sd.delay = 0.5
    env = story_app_env(
        fake_openai, IMAGE_PROVIDER="sdwebui", SD_INSTANCES=fake_sd.url, GRACEFUL_TIMEOUT="20"
    )
    base = gunicorn_server(workers=1, **env)
    db = mongo_client[db_name]
    book = start_book(base, pages=2)
    until(lambda: db.sd_instances.count_documents({"holder": {"$ne": None}}) > 0, 30, "a picture to be drawn")
    master, _ = gunicorn_pids(base)
    os.kill(master, signal.SIGTERM)
    until(lambda: not alive(master), 40, "gunicorn to exit")
    doc = db.jobs.find_one({"_id": book})
    assert doc["status"] == "done", doc.get("error")
    assert (
        db.generations.count_documents({"job": book, "kind": "image"})
        == len(fake_sd.generation_requests())
        == 3
    )
    assert db.sd_instances.count_documents({"holder": {"$ne": None}}) == 0
    log = _log(tmp_path, base)
    assert "Traceback" not in log, log[-5000:]
