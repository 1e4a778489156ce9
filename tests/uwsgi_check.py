"""uWSGI with uwsgi.ini, for real: the app loads, the port comes from the environment, /ping and /health
answer 200, a missing MONGO_URI stops the start with one line, SIGTERM exits cleanly.

Not collected by the default suite (the name does not match test_*.py) because uWSGI is not in the test
extra: it compiles from source, measured at 141 s on the project's 2-core machine. Run it explicitly
after `pip install -e .[uwsgi]`:

    python -m pytest tests/uwsgi_check.py -q

It fails (never skips) when uWSGI is missing.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import free_port, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


def _uwsgi() -> str:
    path = shutil.which("uwsgi", path=str(Path(sys.executable).parent)) or shutil.which("uwsgi")
    assert path, "uWSGI is not installed: pip install -e .[uwsgi] (this check never skips)"
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MONGO_URI", "PORT", "HOST", "DATA_DIR")}
    env.update(UWSGI_VIRTUALENV=sys.prefix, PYTHONPATH=str(ROOT), **extra)
    return env


@pytest.mark.timeout(120)
def test_uwsgi_serves_the_app_on_the_port_from_the_environment(
    mongo_uri: str, db_name: str, fake_openai: Any, tmp_path: Path
) -> None:
    port = free_port()
    env = _env(
        MONGO_URI=mongo_uri,
        MONGO_DB=db_name,
        PORT=str(port),
        DATA_DIR=str(tmp_path / "data"),
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="k",
        WEB_CONCURRENCY="2",
    )
    log_path = tmp_path / "uwsgi.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [_uwsgi(), "--ini", str(ROOT / "uwsgi.ini")],
            cwd=str(tmp_path),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port(port, 60, proc)
        # both workers loaded (lazy-apps: each builds its own app) before any request (one that reaches a
        # worker still importing waits for it) and before the SIGTERM (which must not interrupt an import)
        deadline = time.monotonic() + 90
        while log_path.read_text().count(") ready in ") < 2 and time.monotonic() < deadline:
            time.sleep(0.3)
        assert log_path.read_text().count(") ready in ") == 2, log_path.read_text()[-3000:]
        deadline = time.monotonic() + 30
        while True:  # the socket is bound by the master before the workers have loaded the app
            ping = requests.get(f"http://127.0.0.1:{port}/ping", timeout=10)
            if ping.status_code == 200 or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert ping.status_code == 200, log_path.read_text()[-3000:]
        health = requests.get(f"http://127.0.0.1:{port}/health", timeout=30)
        assert health.status_code == 200, health.text
        assert health.json()["database"]["ok"] is True
        ws = requests.get(
            f"http://127.0.0.1:{port}/storyteller/ws",
            timeout=10,
            headers={
                "Connection": "Upgrade",
                "Upgrade": "websocket",
                "Sec-WebSocket-Version": "13",
                "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==",
            },
        )
        assert ws.status_code == 501 and "not supported under uWSGI" in ws.text, ws.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    text = log_path.read_text()
    assert "unable to load app" not in text and "Traceback" not in text, text[-3000:]
    assert rc == 0, text[-2000:]


@pytest.mark.timeout(60)
def test_uwsgi_without_mongo_uri_stops_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [_uwsgi(), "--ini", str(ROOT / "uwsgi.ini")],
        cwd=str(tmp_path),
        env=_env(PORT=str(free_port()), DATA_DIR=str(tmp_path / "data")),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "config error: MONGO_URI" in proc.stdout + proc.stderr
    assert not (tmp_path / "data").exists()  # no embedded database was started
