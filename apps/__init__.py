"""Flask blueprints: one per app, plus shared plumbing in apps.core."""
