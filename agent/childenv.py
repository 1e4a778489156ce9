"""The environment for the child processes we start (llama.cpp server, model probe, embedded MongoDB).

Children get an explicit, minimal environment, not ours: uvicorn inside llama_cpp.server reads
WEB_CONCURRENCY (gunicorn's worker count) and exits, its settings read PORT/HOST/MODEL and more
from the environment and let them win over its command line, and none of them needs our keys.
Only what a Python process needs to find itself, its libraries and its locale passes.
"""

from __future__ import annotations

import os

PASS_KEYS = (
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TMPDIR",
    "TEMP",
    "TMP",
    "LD_LIBRARY_PATH",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "SYSTEMROOT",
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
)
PASS_PREFIXES = ("LC_", "GGML_")


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """A copy of only the keys in PASS_KEYS / PASS_PREFIXES, plus `extra`."""
    env = {
        key: value for key, value in os.environ.items() if key in PASS_KEYS or key.startswith(PASS_PREFIXES)
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env
