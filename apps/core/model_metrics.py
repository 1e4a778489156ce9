"""Prometheus counters for model calls, fed by every generation record (GenerationRecorder observers).

Latency, tokens and cost are counted in the process that made the call; under gunicorn the
multiprocess mode of prometheus_client (PROMETHEUS_MULTIPROC_DIR) merges the workers on /metrics.
Labels stay low-cardinality: kind, provider, model, status; never user, session or step text.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Histogram

from agent.prices import tokens

MODEL_LATENCY = Histogram(
    "model_call_duration_seconds",
    "Model call latency (chat, stream, moderation, image), retries included",
    ["kind", "provider", "status"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300),
)
MODEL_TOKENS = Counter("model_tokens", "Tokens used by model calls", ["provider", "model", "type"])
MODEL_COST = Counter("model_cost_usd", "Cost of model calls in USD (MODEL_PRICES)", ["provider", "model"])


def observe_record(doc: dict[str, Any]) -> None:
    """One stored generation record -> latency histogram, token and cost counters."""
    provider = str(doc.get("provider") or "unknown")
    model = str(doc.get("model") or "unknown")
    latency = doc.get("latency_ms")
    if isinstance(latency, (int, float)):
        MODEL_LATENCY.labels(str(doc.get("kind")), provider, str(doc.get("status"))).observe(latency / 1000)
    prompt, completion = tokens(doc.get("usage") if isinstance(doc.get("usage"), dict) else None)
    if prompt:
        MODEL_TOKENS.labels(provider, model, "prompt").inc(prompt)
    if completion:
        MODEL_TOKENS.labels(provider, model, "completion").inc(completion)
    cost = doc.get("cost_usd")
    if isinstance(cost, (int, float)) and cost > 0:
        MODEL_COST.labels(provider, model).inc(cost)
