"""Recurring plans: the schedules table read by ``taskexec beat``.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "schedules",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("plan_id", sa.String(200), nullable=False),
        sa.Column("manifests", JSON, nullable=False),
        sa.Column("cron", sa.String(200)),
        sa.Column("every_seconds", sa.Float),
        sa.Column("overlap", sa.String(10), nullable=False),
        sa.Column("tenant", sa.String(200)),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("enabled", sa.Boolean, nullable=False, server_default=sa.true()),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_run_at", TS),
        sa.Column("last_fired_at", TS),
        sa.Column("last_run_ids", JSON),
        sa.Column("last_outcome", sa.Text),
        sa.Column("fired", sa.Integer, nullable=False, server_default="0"),
        sa.Column("skipped", sa.Integer, nullable=False, server_default="0"),
        sa.CheckConstraint("(cron IS NULL) <> (every_seconds IS NULL)", name="ck_schedules_one_trigger"),
    )


def downgrade() -> None:
    op.drop_table("schedules")
