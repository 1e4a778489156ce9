"""The ideation app (see docs/apps.md)."""
