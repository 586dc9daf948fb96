"""Celery tasks, one module per domain. Tasks take ids, load what they need, are idempotent."""
