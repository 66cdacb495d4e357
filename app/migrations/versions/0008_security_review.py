"""security review: dashboard sessions ended on the server; the tenant rate limit as GCRA state

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "dashboard_sessions",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_dashboard_sessions")),
    )
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_dashboard_sessions_expires_at"), ["expires_at"], unique=False)
    # Calendar-minute counters give way to one GCRA state per tenant; a fresh state admits a full burst,
    # as the first submit of a new minute did.
    op.create_table(
        "rate_limits",
        sa.Column("scope", sa.String(length=48), nullable=False),
        sa.Column("tat_us", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("scope", name=op.f("pk_rate_limits")),
    )
    op.drop_table("rate_windows")


def downgrade() -> None:
    op.create_table(
        "rate_windows",
        sa.Column("scope", sa.String(length=48), nullable=False),
        sa.Column("window_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("count", sa.Integer(), nullable=False),
        sa.CheckConstraint("count >= 0", name=op.f("ck_rate_windows_count_nonnegative")),
        sa.PrimaryKeyConstraint("scope", "window_start", name=op.f("pk_rate_windows")),
    )
    op.drop_table("rate_limits")
    with op.batch_alter_table("dashboard_sessions", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_dashboard_sessions_expires_at"))
    op.drop_table("dashboard_sessions")
