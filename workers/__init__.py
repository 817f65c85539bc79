"""The worker side of taskexec: Celery tasks, handlers, validators, artifacts."""
