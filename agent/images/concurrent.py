"""The one `generate_many` of every image provider: all requests at once, results in request order."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from agent.types import ImageProvider, ImageRequest, ImageResult


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
    if not requests:
        return []
    if len(requests) == 1:
        return [provider.generate(requests[0])]
    with ThreadPoolExecutor(
        max_workers=min(max_workers, len(requests)), thread_name_prefix=thread_name_prefix
    ) as pool:
        futures = [pool.submit(provider.generate, r) for r in requests]
        return [f.result() for f in futures]
