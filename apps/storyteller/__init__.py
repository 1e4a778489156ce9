"""The storyteller app (see docs/apps.md)."""
