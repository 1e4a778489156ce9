"""Who gets which SD instance: the pure planning every pool process computes alike.

Pure and deterministic functions of a snapshot of `sd_instances` and `sd_waiters`, so every
process computes the same greedy FIFO plan and claims only for its own queue entries (see
`agent.images.sdwebui.pool`); no database access here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from agent.images.sdwebui.seats import aware, busy_seats, running_since

__all__ = [
    "Pick",
    "affinity_window",
    "aware",
    "checkpoint_key",
    "plan_assignment",
    "plan_seats",
    "up_urls",
    "want",
]


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


@dataclass(frozen=True)
class Pick:
    """One step of the plan: queue entry `entry` gets seat `seat` of instance `url`; `idle`: the instance
    runs nothing (the claim then requires every seat still free, so a busy instance's second seat never
    goes first by accident)."""

    entry: str
    url: str
    seat: int
    idle: bool


def plan_seats(
    waiters: Iterable[dict[str, Any]], instances: Iterable[dict[str, Any]], now: datetime, depth: int = 1
) -> list[Pick]:
    """Who gets which free seat, oldest entry first.

    Pure and deterministic, so every process computes the same plan from the same snapshot
    and claims only for its own entries. An entry wanting n instances is served n times in
    a row. Fully idle instances go first (never queue behind a running image while another
    instance idles); only when none is left (for this entry) does it get the second seat
    of a busy instance (depth 2), the one whose generation started first. Within each
    tier: an instance that has the entry's checkpoint loaded if there is one, else the one
    idle longest (resp. busy longest). An entry avoids the instances in its `exclude`
    unless every up instance is excluded.
    """
    docs = list(instances)
    up = up_urls(docs)
    epoch = datetime.min.replace(tzinfo=UTC)
    idle: list[dict[str, Any]] = []
    second: list[tuple[dict[str, Any], int]] = []
    for d in docs:
        if d["_id"] not in up:
            continue
        busy = busy_seats(d, now, depth)
        if not busy:
            idle.append(d)
        elif len(busy) < depth:
            second.append((d, next(s for s in range(depth) if s not in busy)))
    idle.sort(key=lambda d: (aware(d.get("released_at")) or epoch, d["_id"]))
    second.sort(key=lambda p: (running_since(p[0], now, depth), p[0]["_id"]))
    tiers: list[list[tuple[dict[str, Any], int, bool]]] = [
        [(d, 0, True) for d in idle],
        [(d, s, False) for d, s in second] + [(d, s, False) for d in idle for s in range(1, depth)],
    ]
    plan: list[Pick] = []
    for w in waiters:
        wanted = checkpoint_key(w.get("checkpoint"))
        for _ in range(want(w)):
            if not any(tiers):
                return plan
            choice = None
            for tier in tiers:
                allowed = [t for t in tier if _acceptable(w, t[0]["_id"], up)]
                if allowed:
                    choice = next(
                        (t for t in allowed if wanted and checkpoint_key(t[0].get("checkpoint")) == wanted),
                        allowed[0],
                    )
                    tier.remove(choice)
                    break
            if choice is None:
                break  # an acceptable instance exists but is busy: wait for it
            doc, seat, was_idle = choice
            plan.append(Pick(w["_id"], doc["_id"], seat, was_idle))
    return plan


def plan_assignment(
    waiters: Iterable[dict[str, Any]], instances: Iterable[dict[str, Any]], now: datetime
) -> list[tuple[str, str]]:
    """[(queue entry id, instance URL)]: the one-deep plan (`plan_seats` with depth 1)."""
    return [(p.entry, p.url) for p in plan_seats(waiters, instances, now, 1)]


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
