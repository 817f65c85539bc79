"""Alembic environment: runs on the connection handed in by taskexec.store.engine.upgrade."""

from alembic import context

from taskexec.store.tables import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection, target_metadata=Base.metadata, render_as_batch=connection.dialect.name == "sqlite"
)
with context.begin_transaction():
    context.run_migrations()
