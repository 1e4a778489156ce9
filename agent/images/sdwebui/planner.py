"""Who gets which SD instance: the pure planning every pool process computes alike.

Pure and deterministic functions of a snapshot of `sd_instances` and `sd_waiters`, so every
process computes the same greedy FIFO plan and claims only for its own queue entries (see
`agent.images.sdwebui.pool`); no database access here.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any


def aware(value: Any) -> datetime | None:
    """Datetimes from a client without tz_aware come back naive; they are UTC."""
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def checkpoint_key(name: str | None) -> str | None:
    """Compare checkpoints by name: `v1-5-pruned-emaonly.safetensors [6ce0161689]` == `v1-5-pruned-emaonly`."""
    if not name:
        return None
    key = name.strip().split(" [", 1)[0].replace("\\", "/").rsplit("/", 1)[-1]
    for ext in (".safetensors", ".ckpt", ".pt"):
        if key.lower().endswith(ext):
            key = key[: -len(ext)]
    return key.lower() or None


def want(doc: dict[str, Any]) -> int:
    """How many callers of a queue document still wait for an instance."""
    if "want" in doc:
        return max(0, int(doc.get("want") or 0))
    return 0 if doc.get("assigned") else 1  # a plain one-caller entry


def up_urls(instances: Iterable[dict[str, Any]]) -> set[str]:
    """The instances of a snapshot that are not marked down."""
    return {d["_id"] for d in instances if d.get("state", "up") == "up"}


def _acceptable(entry: dict[str, Any], url: str, up: set[str]) -> bool:
    """An entry avoids instances that failed it, unless every up instance did (a pool of one must retry)."""
    excluded = set(entry.get("exclude") or ())
    return url not in excluded or not (up - excluded)


def plan_assignment(
    waiters: Iterable[dict[str, Any]], instances: Iterable[dict[str, Any]], now: datetime
) -> list[tuple[str, str]]:
    """[(queue entry id, instance URL)]: who gets which free instance, oldest entry first.

    Pure and deterministic, so every process computes the same plan from the same snapshot
    and claims only for its own entries. An entry wanting n instances is served n times in
    a row. Each gets a free up instance that has its checkpoint loaded if there is one,
    else the one idle longest; it avoids the instances in its `exclude` unless every up
    instance is excluded.
    """
    docs = list(instances)
    up = up_urls(docs)
    free = [
        d
        for d in docs
        if d["_id"] in up and (not d.get("holder") or (aware(d.get("lease_until")) or now) < now)
    ]
    epoch = datetime.min.replace(tzinfo=UTC)
    free.sort(key=lambda d: (aware(d.get("released_at")) or epoch, d["_id"]))
    plan: list[tuple[str, str]] = []
    for w in waiters:
        wanted = checkpoint_key(w.get("checkpoint"))
        for _ in range(want(w)):
            if not free:
                return plan
            allowed = [d for d in free if _acceptable(w, d["_id"], up)]
            if not allowed:
                break  # an acceptable instance exists but is busy: wait for it
            pick = next(
                (d for d in allowed if wanted and checkpoint_key(d.get("checkpoint")) == wanted), allowed[0]
            )
            plan.append((w["_id"], pick["_id"]))
            free.remove(pick)
    return plan


def affinity_window(waiters: list[dict[str, Any]], checkpoint: str | None, up: int) -> int | None:
    """For a hand-over of an instance that has `checkpoint` loaded: the highest ticket an entry wanting that
    checkpoint may have to go before older entries, or None when no such entry is in the window.

    The window is the first round of waiting callers (as many as there are up instances):
    they are all about to be served anyway, so serving the one that wants this instance's
    checkpoint first saves a model switch and delays the others by at most one generation.
    """
    key = checkpoint_key(checkpoint)
    if not key:
        return None
    window: list[dict[str, Any]] = []
    for w in waiters:
        window += [w] * want(w)
        if len(window) >= max(1, up):
            break
    window = window[: max(1, up)]
    if not window or not any(checkpoint_key(w.get("checkpoint")) == key for w in window):
        return None
    return int(window[-1]["ticket"])
