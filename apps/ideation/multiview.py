"""The external multi-view tool (`IDEATION_MULTIVIEW_CMD`): one cut-out in, up to six PNG views out.

The command is an argv template with `{input}` and `{output}` placeholders, run without a shell;
any failure to run, a non-zero exit or no views is a ModelError, as for any other image service.
"""

from __future__ import annotations

import shlex
import subprocess
import tempfile
from pathlib import Path

from agent.types import ModelError

MAX_VIEWS = 6


def run_multiview_tool(command: str, cutout: bytes, timeout_s: float) -> list[bytes]:
    """Run the tool on `cutout`; returns its PNG views (sorted by file name, at most MAX_VIEWS)."""
    with tempfile.TemporaryDirectory(prefix="multiview-") as tmp:
        src = Path(tmp) / "input.png"
        out = Path(tmp) / "out"
        out.mkdir()
        src.write_bytes(cutout)
        argv = [
            part.replace("{input}", str(src)).replace("{output}", str(out)) for part in shlex.split(command)
        ]
        try:
            proc = subprocess.run(
                argv, capture_output=True, timeout=timeout_s, check=False
            )  # never a shell string
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise ModelError(
                f"multi-view tool failed to run: {exc}", provider="multiview", kind="image"
            ) from exc
        if proc.returncode != 0:
            tail = proc.stderr.decode(errors="replace")[-300:]
            raise ModelError(
                f"multi-view tool exited with {proc.returncode}: {tail}", provider="multiview", kind="image"
            )
        views = sorted(out.glob("*.png"))[:MAX_VIEWS]
        if not views:
            raise ModelError("multi-view tool produced no PNG views", provider="multiview", kind="image")
        return [p.read_bytes() for p in views]
