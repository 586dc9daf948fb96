"""The Celery worker: aggregation, knowledge interaction, re-clustering."""
