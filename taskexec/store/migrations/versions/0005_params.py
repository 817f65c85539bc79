"""Run parameters (runs.params) and each task's rendered handler params (executions.params).

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_JSON = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("params", _JSON))
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("params", _JSON))


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("params")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("params")
