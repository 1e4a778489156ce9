"""Reject client-supplied JSON object keys that MongoDB cannot store, at the schema (422), not at the write (500).

BSON refuses keys containing a NUL byte; MongoDB refuses top-level keys starting with "$" and reads
"." as a path, so such keys either fail the insert after validation passed or store something else
than the client sent. Shared by the ideation and refinement schemas (the apps that store raw dicts);
it lives in apps/core with the other shared request plumbing.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator

T = TypeVar("T")


def bad_key_reason(key: str) -> str | None:
    """Why MongoDB cannot store `key` as a field name, or None when it can."""
    if "\x00" in key:
        return "must not contain a NUL character"
    if key.startswith("$"):
        return "must not start with '$'"
    if "." in key:
        return "must not contain '.'"
    return None


def find_bad_key(value: Any) -> tuple[str, str] | None:
    """(path, reason) of the first unstorable key anywhere in a JSON value, or None.

    Iterative, so a deeply nested body cannot exhaust the recursion limit.
    """
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        node, path = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    continue
                where = f"{path}.{key}" if path else key
                reason = bad_key_reason(key)
                if reason is not None:
                    return where, reason
                stack.append((child, where))
        elif isinstance(node, (list, tuple)):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(node))
    return None


def check_storable_keys(value: T) -> T:
    """Pydantic validator: the value unchanged, or ValueError naming the first bad key (-> 422)."""
    found = find_bad_key(value)
    if found is not None:
        path, reason = found
        raise ValueError(f"object key {path!r} {reason} (it cannot be stored)")
    return value


# a client dict stored as sent: keys MongoDB cannot store are a 422 at validation, not a 500 at the write
StorableDict = Annotated[dict[str, Any], AfterValidator(check_storable_keys)]
