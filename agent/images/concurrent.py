"""The one `generate_many` of every image provider: all requests at once, results in request order."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from agent.types import ClaimsAhead, ImageProvider, ImageRequest, ImageResult

T = TypeVar("T")


def generate_concurrently(
    provider: ImageProvider,
    requests: list[ImageRequest],
    max_workers: int = 16,
    *,
    thread_name_prefix: str = "img",
) -> list[ImageResult]:
    """Submit every request at once (a single one runs in the caller's thread); the first failure is raised.

    For the SD pool this is what makes the images of one request share a queue entry and
    go to instances as they free up.
    """
    return run_concurrently(provider.generate, requests, max_workers, thread_name_prefix=thread_name_prefix)


def generate_on_claims(
    claimer: object,
    requests: list[ImageRequest],
    generate: Callable[[ImageRequest, Any], ImageResult],
    max_workers: int = 16,
    *,
    thread_name_prefix: str = "img",
) -> list[ImageResult]:
    """`generate(request, claim)` for every request at once, with the claims `claimer` takes for them in one
    go if it can (`ClaimsAhead`, the SD pool's idle instances), else None each."""
    claims = claimer.claim_many(requests) if isinstance(claimer, ClaimsAhead) else [None] * len(requests)
    return run_concurrently(
        lambda pair: generate(*pair),
        list(zip(requests, claims, strict=True)),
        max_workers,
        thread_name_prefix=thread_name_prefix,
    )


def run_concurrently(
    fn: Callable[[T], ImageResult],
    items: Sequence[T],
    max_workers: int = 16,
    *,
    thread_name_prefix: str = "img",
) -> list[ImageResult]:
    """`fn` over every item at once (a single one in the caller's thread); results in order, first failure raised."""
    if not items:
        return []
    if len(items) == 1:
        return [fn(items[0])]
    with ThreadPoolExecutor(
        max_workers=min(max_workers, len(items)), thread_name_prefix=thread_name_prefix
    ) as pool:
        futures = [pool.submit(fn, item) for item in items]
        return [f.result() for f in futures]
