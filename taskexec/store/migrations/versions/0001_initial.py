"""Initial schema: runs, executions, execution_logs, execution_metrics.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(36), primary_key=True),
        sa.Column("plan_id", sa.String(200), nullable=False),
        sa.Column("plan_name", sa.String(500)),
        sa.Column("variant", sa.String(200), nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("manifest", JSON, nullable=False),
        sa.Column("statistics", JSON),
        sa.Column("tenant", sa.String(200)),
        sa.Column("labels", JSON, nullable=False),
        sa.Column("stage_count", sa.Integer, nullable=False),
        sa.Column("stage_cursor", sa.Integer, nullable=False),
        sa.Column("epoch", sa.Integer, nullable=False),
        sa.Column("stop_reason", sa.String(20)),
        sa.Column("broker_instance", sa.String(64)),
        sa.Column("error_message", sa.Text),
        sa.Column("submitted_at", TS, nullable=False),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_runs_status", "runs", ["status"])
    op.create_index("ix_runs_tenant", "runs", ["tenant"])
    op.create_index("ix_runs_submitted_at", "runs", ["submitted_at"])
    op.create_table(
        "executions",
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("task_id", sa.String(300), primary_key=True),
        sa.Column("stage", sa.Integer, nullable=False),
        sa.Column("status", sa.String(20), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("throttled", sa.Integer, nullable=False, server_default="0"),
        sa.Column("lease_until", TS),
        sa.Column("not_before", TS),
        sa.Column("deferred", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("output", JSON),
        sa.Column("error_code", sa.String(8)),
        sa.Column("error_message", sa.Text),
        sa.Column("worker", sa.String(300)),
        sa.Column("started_at", TS),
        sa.Column("finished_at", TS),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_index("ix_executions_run_stage", "executions", ["run_id", "stage"])
    op.create_index("ix_executions_status_lease", "executions", ["status", "lease_until"])
    op.create_index("ix_executions_status_due", "executions", ["status", "not_before"])
    op.create_table(
        "execution_logs",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
                  nullable=False),
        sa.Column("task_id", sa.String(300)),
        sa.Column("attempt", sa.Integer, nullable=False),
        sa.Column("event", sa.String(20), nullable=False),
        sa.Column("from_status", sa.String(20)),
        sa.Column("to_status", sa.String(20)),
        sa.Column("error_code", sa.String(8)),
        sa.Column("message", sa.Text),
        sa.Column("worker", sa.String(300)),
        sa.Column("at", TS, nullable=False),
    )
    op.create_index("ix_execution_logs_run_task", "execution_logs", ["run_id", "task_id"])
    op.create_table(
        "execution_metrics",
        sa.Column("run_id", sa.String(36), sa.ForeignKey("runs.run_id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("task_id", sa.String(300), primary_key=True),
        sa.Column("attempt", sa.Integer, primary_key=True),
        sa.Column("name", sa.String(100), primary_key=True),
        sa.Column("value", sa.Float, nullable=False),
        sa.Column("recorded_at", TS, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("execution_metrics")
    op.drop_table("execution_logs")
    op.drop_table("executions")
    op.drop_table("runs")
