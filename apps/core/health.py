"""`/health`: probe every dependency a request needs, so "ok" means requests can work.

Why: the old check pinged only the database and said "ok" with `SD_INSTANCES` pointing at
nothing, an unreachable model server, broken templates or a model that crashed on every call;
the first real request then waited minutes and failed. Each part is probed for real:

- `database`: a ping;
- `model`: the provider's own check (`LLM.health()`): a models-list call for openai/azure, the
  child-process self-test for the embedded model;
- `images`: SD WebUI instances pinged (at least one must answer); the OpenAI images endpoint
  gets the same models-list call; placeholder images are always ok;
- `prompts`: every template loads and renders its samples (re-checked only when a file changed).

Probes run concurrently in daemon threads, so one slow dependency costs at most `timeout_s`
(a probe still running then is reported as not ok and is not started twice). The report is cached
per app for `cache_s` seconds and computed by one caller at a time: a load balancer polling every
worker does not turn into a stream of model calls. Liveness stays `/ping`.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.llm.providers.openai_compat import probe_models

from .context import Services
from .db import ping as db_ping

PARTS = ("database", "model", "images", "prompts")
CACHE_S = 5.0
TIMEOUT_S = 4.0

_REMEDIES: dict[str, str] = {
    "database": "check MONGO_URI and that MongoDB runs (unset MONGO_URI: the embedded one under DATA_DIR)",
    "model:openai": "check OPENAI_BASE_URL (the API root, usually ending in /v1), OPENAI_API_KEY and that "
    "the model server runs",
    "model:azure": "check AZURE_OPENAI_ENDPOINT, AZURE_OPENAI_API_KEY and AZURE_OPENAI_API_VERSION",
    "model:local": "see docs/local-llm.md (LOCAL_MODEL_PATH, scripts/install-llama.sh)",
    "images:sdwebui": "start an SD WebUI with --api at one of SD_INSTANCES (or fix the list), "
    "or set IMAGE_PROVIDER=placeholder",
    "images:openai": "check the OpenAI/Azure endpoint and key the images use, and OPENAI_IMAGE_MODEL",
    "prompts": "fix the templates listed (`flask prompts check` shows every problem)",
}
MAX_PROMPT_ERRORS = 20  # listed in the report; the count says how many there were


class _Probe:
    """One part's check running in a daemon thread (a hung probe must not hold up a worker's exit)."""

    def __init__(self, fn: Callable[[], dict[str, Any]]) -> None:
        self.result: dict[str, Any] | None = None
        self.done = threading.Event()
        self.started = time.monotonic()
        self._thread = threading.Thread(target=self._run, args=(fn,), name="health-probe", daemon=True)
        self._thread.start()

    def _run(self, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            self.result = fn()
        except Exception as exc:  # noqa: BLE001 - a failing probe is a finding, reported as text
            self.result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.done.set()


class HealthCheck:
    """Cached, bounded probes of one app's services (one instance per app, per process)."""

    def __init__(
        self,
        svc: Services,
        *,
        apps: list[str] | None = None,
        cache_s: float = CACHE_S,
        timeout_s: float = TIMEOUT_S,
    ) -> None:
        self.svc = svc
        self.apps = sorted(apps or [])
        self.cache_s = cache_s
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._cached: dict[str, Any] | None = None
        self._cached_at = 0.0
        self._running: dict[str, _Probe] = {}

    # ---- the report
    def report(self) -> dict[str, Any]:
        """The cached report if younger than `cache_s`, else a fresh one (one caller computes it)."""
        with self._lock:
            if self._cached is not None and time.monotonic() - self._cached_at < self.cache_s:
                return self._cached
            body = self._check()
            self._cached, self._cached_at = body, time.monotonic()
            return body

    def _check(self) -> dict[str, Any]:
        checks: dict[str, Callable[[], dict[str, Any]]] = {
            "database": self._database,
            "model": self._model,
            "images": self._images,
            "prompts": self._prompts,
        }
        probes: dict[str, _Probe] = {}
        for part, fn in checks.items():
            # a probe still running from last time is waited for again, not started twice
            probe = self._running.get(part)
            if probe is None or probe.done.is_set():
                probe = self._running[part] = _Probe(fn)
            probes[part] = probe
        deadline = time.monotonic() + self.timeout_s
        results: dict[str, dict[str, Any]] = {}
        for part, probe in probes.items():
            if probe.done.wait(max(0.0, deadline - time.monotonic())):
                results[part] = probe.result or {"ok": False, "error": "the probe ended without a result"}
                del self._running[part]
            else:
                waited = time.monotonic() - probe.started
                results[part] = {"ok": False, "error": f"no answer after {waited:.1f} s (still checking)"}
        return self._assemble(results)

    def _assemble(self, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
        problems = []
        for part in PARTS:
            result = results[part]
            if result.get("ok"):
                continue
            provider = result.get("provider")
            remedy = result.get("remedy") or _REMEDIES.get(f"{part}:{provider}") or _REMEDIES.get(part, "")
            problems.append({"part": part, "error": str(result.get("error") or "not ok"), "remedy": remedy})
        if not results["database"].get("ok"):
            status = "down"  # nothing a request does works without it
        else:
            status = "degraded" if problems else "ok"
        body: dict[str, Any] = {"status": status}
        if problems:
            body["problems"] = problems
        body.update({part: results[part] for part in PARTS})
        body["apps"] = self.apps
        return body

    # ---- the parts
    def _database(self) -> dict[str, Any]:
        out = db_ping(self.svc.db)
        # gunicorn's master hands the embedded server's URI to the workers and marks it (gunicorn.conf.py)
        out["embedded"] = not self.svc.settings.MONGO_URI or os.environ.get("EMBEDDED_MONGO") == "1"
        return out

    def _model(self) -> dict[str, Any]:
        return dict(self.svc.llm.health())

    def _images(self) -> dict[str, Any]:
        provider = self.svc.image_provider
        out = dict(provider.health())
        if self.svc.settings.IMAGE_PROVIDER == "openai":
            inner = getattr(provider, "inner", provider)  # agent/images/recording.py
            client = getattr(inner, "client", None)
            if client is None:
                return {**out, "ok": False, "error": "the openai image provider has no client to probe"}
            out.pop("note", None)  # "not probed": it is now, for free (no image is made)
            out.update(probe_models(client, str(out.get("provider") or "openai")))
        return out

    def _prompts(self) -> dict[str, Any]:
        library = self.svc.prompts
        count, errors = library.check_cached()
        out: dict[str, Any] = {"ok": count > 0 and not errors, "templates": count, "dir": str(library.root)}
        if count == 0:
            out["error"] = f"no templates (*.j2) under {library.root}"
            out["remedy"] = "set PROMPTS_DIR to the settings folder with the apps' templates"
        elif errors:
            out["error"] = f"{len(errors)} template problem(s): {errors[0]}"
            out["errors"] = errors[:MAX_PROMPT_ERRORS]
        return out


_checks_lock = threading.Lock()


def health_check(app: Any) -> HealthCheck:
    """The app's HealthCheck, made on first use (so its cache is shared by the app's threads)."""
    with _checks_lock:
        check = app.extensions.get("health")
        if check is None:
            settings = app.extensions["services"].settings
            check = app.extensions["health"] = HealthCheck(
                app.extensions["services"],
                apps=list(app.config.get("APPS_MOUNTED", [])),
                cache_s=settings.HEALTH_CACHE_S,
                timeout_s=settings.HEALTH_TIMEOUT_S,
            )
        return check


def health_report(app: Any) -> tuple[dict[str, Any], int]:
    """(body, HTTP status): 200 only when every part is ok, else 503 (degraded or down)."""
    body = health_check(app).report()
    return body, 200 if body["status"] == "ok" else 503
