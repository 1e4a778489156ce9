"""Registers every app's blueprint (the seeds' convention), each at its own prefix.

`ROOT_APP=<name>` also mounts that app's routes at `/`, because the real frontends
call root paths such as `/generate` and `/paint/start`.
"""

from __future__ import annotations

import importlib
from typing import Any

from .core.envelope import mark_envelope

PREFIXES = {
    "storybook": "/storybook",
    "ideation": "/ideation",
    "refinement": "/refinement",
    "storyteller": "/storyteller",
}
ENVELOPE_APPS = {"ideation", "refinement"}


def register_apps(app: Any, root_app: str | None) -> list[str]:
    mounted = []
    for name, prefix in PREFIXES.items():
        module = importlib.import_module(f"apps.{name}.routes")
        bp = module.bp
        if name in ENVELOPE_APPS:
            mark_envelope(bp.name, prefix)
        app.register_api(bp, url_prefix=prefix)
        if hasattr(module, "init_app"):
            module.init_app(app)
        mounted.append(prefix)
        if root_app == name:
            # a second registration under another name; docs list the prefixed paths only
            app.register_blueprint(bp, url_prefix="", name=f"{name}_root")
            if name in ENVELOPE_APPS:
                mark_envelope(f"{name}_root")
            mounted.append(f"/ ({name})")
    return mounted
