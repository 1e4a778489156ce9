"""The one way an app reads an image a client names (by URL or id): only if the caller may read it.

Every input that takes an image reference (`/images/<id>.png`, absolute or server-relative, or a bare
id) resolves it here, so "may Bob use this image?" has one answer everywhere, and it is the same
answer as `GET /images/<id>.png`: the owner (or an admin) when auth is on, anyone with the URL when
`IMAGE_ACCESS=link`. An image the caller may not read is answered exactly like a missing one (404, same
body), so a reference cannot be used to probe which ids exist.
"""

from __future__ import annotations

import re

from .auth import check_owner
from .context import Services
from .errors import ApiError
from .storage import ID_PATTERN, StoredImage

IMAGE_NOT_FOUND = "image not found"
_URL = re.compile(rf"/images/({ID_PATTERN})\.png(?:$|[?#])")
_BARE_ID = re.compile(rf"^{ID_PATTERN}$")


def image_id_of(ref: str) -> str | None:
    """The image id a reference names (URL or bare id), or None when it is not a reference to ours."""
    if not isinstance(ref, str):
        return None
    ref = ref.strip()
    match = _URL.search(ref)
    if match:
        return match.group(1)
    return ref if _BARE_ID.match(ref) else None


def check_image_readable(svc: Services, info: StoredImage) -> None:
    """404 unless the caller may read this image (the rule of GET /images/<id>.png)."""
    if svc.settings.IMAGE_ACCESS == "owner":
        check_owner(info.metadata.get("user"), IMAGE_NOT_FOUND)


def read_image(svc: Services, image_id: str) -> tuple[StoredImage, bytes]:
    """(info, bytes) of an image the caller may read; a 404 that looks like a missing image otherwise."""
    found = svc.images.fetch(image_id)
    if found is None:
        raise ApiError(404, IMAGE_NOT_FOUND)
    check_image_readable(svc, found[0])
    return found


def read_image_ref(svc: Services, ref: str) -> tuple[StoredImage, bytes] | None:
    """Resolve a client's image reference; None when `ref` is not a reference (e.g. a data URL)."""
    image_id = image_id_of(ref)
    return None if image_id is None else read_image(svc, image_id)
