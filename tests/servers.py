"""How tests and benchmarks start the real server: one gunicorn command line, used by both."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def gunicorn_argv(port: int, workers: int) -> list[str]:
    """`python -m gunicorn` with the project's gunicorn.conf.py serving app:app on 127.0.0.1:port."""
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "-c",
        str(ROOT / "gunicorn.conf.py"),
        "-w",
        str(workers),
        "-b",
        f"127.0.0.1:{port}",
        "app:app",
    ]
