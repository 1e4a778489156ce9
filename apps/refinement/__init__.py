"""The refinement app (see docs/apps.md)."""
