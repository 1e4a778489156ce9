"""`/metrics` in Prometheus text format.

Request counters and latencies are kept per process; under gunicorn they are merged
across workers with prometheus_client's multiprocess mode (gunicorn.conf.py sets
PROMETHEUS_MULTIPROC_DIR). Job states, SD queue depth per instance and model calls
are read from MongoDB at scrape time, so every worker reports the same cluster view.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta

from flask import Flask, Response, g, request
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector
from pymongo.errors import PyMongoError

from agent.images.sdwebui.seats import MAX_DEPTH, busy_seats

REQUESTS = Counter("http_requests_total", "HTTP requests", ["method", "route", "status"])
LATENCY = Histogram(
    "http_request_duration_seconds",
    "HTTP request latency (streams: time to first byte)",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)


class DatabaseCollector:
    """Gauges read from MongoDB at scrape time (shared state: same answer from every worker)."""

    def __init__(self, app: Flask) -> None:
        self.app = app

    def collect(self):  # noqa: ANN201 - prometheus collector protocol
        db = self.app.extensions["services"].db
        up = GaugeMetricFamily("database_up", "MongoDB answers")
        try:
            jobs = GaugeMetricFamily("jobs", "Jobs by app and status", labels=["app", "status"])
            for row in db.jobs.aggregate(
                [{"$group": {"_id": {"app": "$app", "status": "$status"}, "n": {"$sum": 1}}}]
            ):
                jobs.add_metric([str(row["_id"].get("app")), str(row["_id"].get("status"))], row["n"])
            busy = GaugeMetricFamily(
                "sd_instance_busy", "1 while an SD instance holds a lease (either seat)", labels=["instance"]
            )
            state = GaugeMetricFamily(
                "sd_instance_up", "1 when an SD instance is healthy", labels=["instance"]
            )
            now = datetime.now(UTC)
            for doc in db.sd_instances.find():
                held = bool(busy_seats(doc, now, MAX_DEPTH))  # either seat (SD_QUEUE_DEPTH=2)
                busy.add_metric([doc["_id"]], 1.0 if held else 0.0)
                state.add_metric([doc["_id"]], 1.0 if doc.get("state", "up") == "up" else 0.0)
            waiting = GaugeMetricFamily("sd_waiting_callers", "Callers waiting for a free SD instance")
            # one queue entry per request; `want` is how many of its images still wait for an instance
            queued = db.sd_waiters.aggregate(
                [
                    {"$match": {"expires_at": {"$gt": now}, "want": {"$gt": 0}}},
                    {"$group": {"_id": None, "n": {"$sum": "$want"}}},
                ]
            )
            waiting.add_metric([], float(next(iter(queued), {}).get("n", 0)))
            calls = GaugeMetricFamily(
                "model_calls_last_hour", "Model calls in the last hour", labels=["kind", "provider", "ok"]
            )
            since = now - timedelta(hours=1)
            pipeline = [
                {"$match": {"created_at": {"$gte": since}}},
                {
                    "$group": {
                        "_id": {"kind": "$kind", "provider": "$provider", "ok": "$ok"},
                        "n": {"$sum": 1},
                    }
                },
            ]
            for row in db.generations.aggregate(pipeline):
                key = row["_id"]
                calls.add_metric(
                    [str(key.get("kind")), str(key.get("provider")), str(key.get("ok")).lower()], row["n"]
                )
            up.add_metric([], 1.0)
            yield from (up, jobs, busy, state, waiting, calls)
        except PyMongoError:
            up.add_metric([], 0.0)
            yield up


def init_metrics(app: Flask) -> None:
    db_collector = DatabaseCollector(app)

    @app.before_request
    def _start_timer() -> None:
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(resp: Response) -> Response:
        started = g.get("request_started")
        if started is not None:
            route = request.url_rule.rule if request.url_rule else "<unmatched>"
            LATENCY.labels(request.method, route).observe(time.perf_counter() - started)
            REQUESTS.labels(request.method, route, str(resp.status_code)).inc()
        return resp

    @app.get("/metrics", doc_ui=False)
    def metrics() -> Response:
        registry = CollectorRegistry()
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            MultiProcessCollector(registry)
            text = generate_latest(registry)
        else:
            from prometheus_client import REGISTRY

            text = generate_latest(REGISTRY)
        db_registry = CollectorRegistry()
        db_registry.register(db_collector)
        return Response(text + generate_latest(db_registry), mimetype=CONTENT_TYPE_LATEST)
