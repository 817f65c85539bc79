"""executions.blockers: a task's upstream tasks not yet ended (``execution: dag`` runs).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-08
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("blockers", sa.Integer(), nullable=False, server_default="0"))
    # "Has this run a task not yet ended?", asked after each task of a dag run ends: one
    # index lookup, not a scan of the run's rows.
    op.create_index("ix_executions_run_status", "executions", ["run_id", "status"])


def downgrade() -> None:
    op.drop_index("ix_executions_run_status", table_name="executions")
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("blockers")
