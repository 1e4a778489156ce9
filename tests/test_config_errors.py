"""A bad setting stops every entry point with one line naming the key, not a traceback (issue 14)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from config import CONFIG_ERROR_EXIT, ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent

BAD = [
    ("SD_INSTANCES", "garbage"),
    ("OPENAI_BASE_URL", "notaurl"),
    ("MONGO_URI", "http://x"),
]


def _env(tmp_path: Path, key: str, value: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MONGO_URI", "SD_INSTANCES", "OPENAI_BASE_URL"}}
    env.update(
        DATA_DIR=str(tmp_path / "data"),
        PYTHONPATH=str(ROOT),
        LLM_PROVIDER="openai",
        OPENAI_API_KEY="k",
        **{key: value},
    )
    return env


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=60)


def _assert_one_line(proc: subprocess.CompletedProcess[str], key: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == CONFIG_ERROR_EXIT, (proc.returncode, out[-2000:])
    lines = [line for line in out.splitlines() if line.startswith("config error:")]
    assert len(lines) == 1, out[-2000:]
    assert lines[0].startswith(f"config error: {key}: "), lines
    assert "Traceback" not in out and "ValidationError" not in out, out[-2000:]


@pytest.mark.parametrize(("key", "value"), BAD)
def test_gunicorn_stops_with_one_line(tmp_path: Path, key: str, value: str) -> None:
    proc = _run(
        [sys.executable, "-m", "gunicorn", "-c", "gunicorn.conf.py", "-b", "127.0.0.1:0", "app:app"],
        _env(tmp_path, key, value),
    )
    _assert_one_line(proc, key)
    assert "Booting worker" not in proc.stderr  # the master stopped before any worker


@pytest.mark.parametrize(("key", "value"), BAD)
def test_flask_cli_stops_with_one_line(tmp_path: Path, key: str, value: str) -> None:
    proc = _run(
        [sys.executable, "-m", "flask", "--app", "app", "prompts", "list"], _env(tmp_path, key, value)
    )
    _assert_one_line(proc, key)


def test_python_app_py_stops_with_one_line(tmp_path: Path) -> None:
    _assert_one_line(
        _run([sys.executable, "app.py"], _env(tmp_path, "SD_INSTANCES", "garbage")), "SD_INSTANCES"
    )


def test_worker_app_attribute_stops_with_one_line(tmp_path: Path) -> None:
    """What a gunicorn (or uWSGI) worker does to load `app:app`: the module's lazy __getattr__."""
    proc = _run([sys.executable, "-c", "import app; app.app"], _env(tmp_path, "OPENAI_BASE_URL", "ftp://x"))
    _assert_one_line(proc, "OPENAI_BASE_URL")


def _problems(**overrides: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_settings(overrides, use_env=False)
    return info.value.lines()


def test_each_bad_key_gets_its_own_line() -> None:
    lines = _problems(
        SD_INSTANCES="http://127.0.0.1:7860,127.0.0.1:7861",
        PUBLIC_BASE_URL="https://",
        AZURE_OPENAI_ENDPOINT="http://h:99999",
        PORT="x",
    )
    keys = sorted(line.split(":")[1].strip() for line in lines)
    assert keys == ["AZURE_OPENAI_ENDPOINT", "PORT", "PUBLIC_BASE_URL", "SD_INSTANCES"], lines
    sd = next(line for line in lines if "SD_INSTANCES" in line)
    assert "instance 2 of 2" in sd and "127.0.0.1:7861" in sd
    assert any("PORT: " in line and "'x'" in line for line in lines)


def test_mongo_uri_errors_never_echo_the_uri() -> None:
    (line,) = _problems(MONGO_URI="mongodb://user:s3cret@host:port/db")
    assert line.startswith("config error: MONGO_URI: ") and "s3cret" not in line


def test_model_level_error_names_its_key() -> None:
    assert _problems(IMAGE_PROVIDER="sdwebui") == [
        "config error: IMAGE_PROVIDER: sdwebui needs SD_INSTANCES (comma-separated WebUI base URLs)"
    ]


def test_good_urls_load_without_network() -> None:
    s = load_settings(
        {
            "SD_INSTANCES": "http://127.0.0.1:7860/, https://sd.example.org",
            "OPENAI_BASE_URL": "http://127.0.0.1:11434/v1",
            "PUBLIC_BASE_URL": "",
            "MONGO_URI": "mongodb+srv://cluster0.invalid/db?retryWrites=true",
        },
        use_env=False,
    )
    assert s.SD_INSTANCES == ["http://127.0.0.1:7860", "https://sd.example.org"]
    assert s.PUBLIC_BASE_URL is None  # empty = unset
    assert s.MONGO_URI and s.MONGO_URI.startswith("mongodb+srv://")  # no SRV lookup of the .invalid host
