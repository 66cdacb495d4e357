"""dashboard: per-tenant per-day rollup; indexes the dashboard's lists need

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "daily_usage",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("spent_cents", sa.Integer(), nullable=False),
        sa.Column("predictions", sa.Integer(), nullable=False),
        sa.Column("refusals", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_daily_usage_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", "day", name=op.f("pk_daily_usage")),
    )
    with op.batch_alter_table("daily_usage", schema=None) as batch_op:
        batch_op.create_index("ix_daily_usage_day_tenant_id", ["day", "tenant_id"], unique=False)
    # The ledger so far, summed once; from here on the rollup is kept as money moves.
    op.execute(
        "INSERT INTO daily_usage (tenant_id, day, spent_cents, predictions, refusals) "
        "SELECT tenant_id, date(created_at), sum(spent_delta), "
        "sum(CASE WHEN kind = 'settle' THEN 1 ELSE 0 END), 0 "
        "FROM ledger_entries WHERE spent_delta != 0 GROUP BY tenant_id, date(created_at)"
    )
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.create_index("ix_webhook_deliveries_status_id", ["status", "id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("webhook_deliveries", schema=None) as batch_op:
        batch_op.drop_index("ix_webhook_deliveries_status_id")
    with op.batch_alter_table("daily_usage", schema=None) as batch_op:
        batch_op.drop_index("ix_daily_usage_day_tenant_id")
    op.drop_table("daily_usage")
