"""Shared fixtures: real servers on 127.0.0.1 only.

- `mongo_uri`: the embedded MongoDB (secantusdb, its own process, with --auth; the URI carries the
  password) once per test session.
- `fake_openai`, `fake_sd`: real HTTP fake model servers (tests/fakes).
- `make_app(**overrides)`: a fresh app per test on its own fresh database.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pymongo import MongoClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from apps.core.embedded_mongo import ensure_embedded_mongo, stop_embedded_mongo  # noqa: E402
from tests.servers import gunicorn_argv  # noqa: E402

# Tests never pick up a developer's cloud settings from the environment.
for _key in (
    "MONGO_URI",
    "LLM_PROVIDER",
    "OPENAI_BASE_URL",
    "OPENAI_API_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_DEPLOYMENT",
    "SD_INSTANCES",
    "IMAGE_PROVIDER",
    "AUTH_MODE",
    "ROOT_APP",
):
    os.environ.pop(_key, None)

ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session")
def mongo_data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("mongo")
    yield path
    stop_embedded_mongo(path)


@pytest.fixture(scope="session")
def mongo_uri(mongo_data_dir: Path) -> str:
    return ensure_embedded_mongo(mongo_data_dir).uri


@pytest.fixture(scope="session")
def mongo_client(mongo_uri: str) -> Iterator[MongoClient]:
    client: MongoClient = MongoClient(mongo_uri, tz_aware=True)
    yield client
    client.close()


@pytest.fixture
def db_name() -> str:
    return "t_" + secrets.token_hex(6)


@pytest.fixture
def db(mongo_client: MongoClient, db_name: str) -> Iterator[Any]:
    database = mongo_client[db_name]
    yield database
    mongo_client.drop_database(db_name)


@pytest.fixture
def fake_openai() -> Iterator[Any]:
    from tests.fakes.fake_openai import FakeOpenAI

    with FakeOpenAI() as fake:
        yield fake


@pytest.fixture
def fake_sd() -> Iterator[Any]:
    from tests.fakes.fake_sd import FakeSD

    with FakeSD() as fake:
        yield fake


@pytest.fixture
def fake_sd_fleet() -> Iterator[Callable[..., list[Any]]]:
    """fake_sd_fleet(k, delay=0.0) -> k running FakeSD instances, all stopped after the test."""
    from tests.fakes.fake_sd import FakeSD

    started: list[Any] = []

    def make(k: int, delay: float = 0.0) -> list[Any]:
        fleet = [FakeSD(delay=delay, name=f"sd{i}").start() for i in range(k)]
        started.extend(fleet)
        return fleet

    yield make
    for fake in started:
        fake.stop()


@pytest.fixture
def base_config(mongo_uri: str, db_name: str, tmp_path: Path) -> dict[str, Any]:
    return {
        "MONGO_URI": mongo_uri,
        "MONGO_DB": db_name,
        "DATA_DIR": str(tmp_path / "data"),
        "LLM_RETRY_BASE_S": 0.01,
        "SSE_HEARTBEAT_S": 1.0,
        "SSE_POLL_S": 0.05,
        "JOB_LEASE_S": 3.0,
    }


@pytest.fixture
def make_app(
    base_config: dict[str, Any], mongo_client: MongoClient, db_name: str
) -> Iterator[Callable[..., Any]]:
    """make_app(**overrides) -> app on a fresh database; closed after the test."""
    from app import create_app

    apps: list[Any] = []

    def make(**overrides: Any) -> Any:
        application = create_app({**base_config, **overrides})
        application.testing = True
        apps.append(application)
        return application

    yield make
    for application in apps:
        application.extensions["services"].close()
    mongo_client.drop_database(db_name)


@pytest.fixture
def openai_app(make_app: Callable[..., Any], fake_openai: Any) -> Any:
    """An app whose LLM is the fake OpenAI server (fast, scriptable) and images the placeholder."""
    return make_app(
        LLM_PROVIDER="openai",
        OPENAI_BASE_URL=fake_openai.url,
        OPENAI_API_KEY="test-key",
        LLM_MODEL="fake-model",
    )


@pytest.fixture
def client(openai_app: Any) -> Any:
    return openai_app.test_client()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on {port} after {timeout}s")


@pytest.fixture
def gunicorn_server(base_config: dict[str, Any], tmp_path: Path) -> Iterator[Callable[..., str]]:
    """gunicorn_server(workers=2, **env) -> base URL of a real gunicorn running app:app.

    An env value of None removes the key (MONGO_URI=None: the master starts its own embedded database).
    """
    procs: list[subprocess.Popen] = []

    def start(workers: int = 2, **env_overrides: Any) -> str:
        port = free_port()
        env = {
            **os.environ,
            **{k: str(v) for k, v in base_config.items()},
            **{k: str(v) for k, v in env_overrides.items()},
        }
        env = {k: v for k, v in env.items() if k not in env_overrides or env_overrides[k] is not None}
        env["PYTHONPATH"] = str(ROOT)
        log = open(tmp_path / f"gunicorn-{port}.log", "wb")  # noqa: SIM115 - closed with the process
        proc = subprocess.Popen(
            gunicorn_argv(port, workers),
            cwd=str(ROOT),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        wait_for_port(port, 60, proc)
        return f"http://127.0.0.1:{port}"

    yield start
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
