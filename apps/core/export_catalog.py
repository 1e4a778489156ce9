"""Which collections `flask export --app X` writes: the shared ones plus each app's own.

An explicit object held by `Services` (`services.exports`): each app's `init_app` adds its
collections, so what is exported never depends on which modules happen to be imported.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ExportCollection:
    """How to select one app's (and one user's) documents of a collection."""

    owner_app: str | None  # the collection belongs to this app only (None: shared, filtered by app_field)
    app_field: str | None  # field holding the app name, for shared collections
    user_field: str | None  # field holding the user name (None: the user filter does not apply)
    time_field: str = "created_at"


class ExportCatalog:
    """Collection name -> how to select from it; starts with the collections every app shares."""

    def __init__(self) -> None:
        self._specs: dict[str, ExportCollection] = {
            "generations": ExportCollection(None, "app", "user"),
            "jobs": ExportCollection(None, "app", "owner"),
        }

    def add(
        self, collection: str, app_name: str, user_field: str | None = "user", time_field: str = "created_at"
    ) -> None:
        """An app's own collection, exported with `--app app_name` (filtered by `user_field`)."""
        self._specs[collection] = ExportCollection(app_name, None, user_field, time_field)

    def names(self) -> list[str]:
        return list(self._specs)

    def items(self) -> Iterator[tuple[str, ExportCollection]]:
        return iter(list(self._specs.items()))
