"""The storybook app (see docs/apps.md)."""
