"""Shared plumbing: errors + envelope, validation, db, storage, jobs + SSE, auth."""
