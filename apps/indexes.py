"""Every index of the core and of every app, in one explicit list run by `create_app`.

Why a list and not only `@register_indexes`: a decorator registers when its module is
imported, and `create_app` used to create indexes before the app modules were imported.
The test suite builds many apps in one process, so it never noticed; a fresh gunicorn
worker created no app index at all (unique ones included). Every process now runs this
list at start, whatever has been imported. Creating an existing index is a no-op.

A new app (or core module) with indexes adds its function here; `tests/test_lifecycle.py`
fails if a `@register_indexes` function is missing from the list.
"""

from __future__ import annotations

from pymongo.database import Database

from apps.core.db import IndexFn


def index_functions() -> list[IndexFn]:
    """The index functions of the core, the agent layer and every app, in a fixed order."""
    from agent.images.sdwebui.pool import ensure_pool_indexes
    from agent.records import create_generation_indexes
    from apps.core import auth, jobs, spend, storage
    from apps.ideation import service as ideation
    from apps.refinement import store as refinement
    from apps.storybook import service as storybook
    from apps.storyteller import store as storyteller

    return [
        # core
        create_generation_indexes,
        spend._indexes,  # the daily-cap query on generations
        jobs._indexes,
        storage._indexes,
        auth._indexes,
        ensure_pool_indexes,
        # apps
        storybook.ensure_indexes,
        ideation._indexes,
        refinement._indexes,
        storyteller._indexes,
    ]


def create_all_indexes(db: Database) -> int:
    """Create every index; returns how many index functions ran."""
    functions = index_functions()
    for fn in functions:
        fn(db)
    return len(functions)
