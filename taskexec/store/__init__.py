"""The result store: SQLAlchemy 2 tables, engine, repository (writes), results (reads); Alembic."""

from taskexec.store import repository, results
from taskexec.store.engine import Store, database_url, upgrade

__all__ = ["Store", "database_url", "repository", "results", "upgrade"]
