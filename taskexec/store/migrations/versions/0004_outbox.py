"""The publication outbox: executions.outbox marks queued rows whose message is not yet sent.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("outbox", sa.String(40)))
    # The reconciler looks for rows still in the outbox: few at any time, so a partial index.
    op.create_index(
        "ix_executions_outbox",
        "executions",
        ["outbox"],
        postgresql_where=sa.text("outbox IS NOT NULL"),
        sqlite_where=sa.text("outbox IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_outbox", table_name="executions")
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("outbox")
