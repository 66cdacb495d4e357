"""provider_days: each provider's upstream calls per UTC day, for the dashboard's Providers page

Revision ID: 0010
Revises: 0006
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_days",
        sa.Column("provider", sa.String(length=32), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("submits", sa.Integer(), nullable=False),
        sa.Column("accepted", sa.Integer(), nullable=False),
        sa.Column("throttled", sa.Integer(), nullable=False),
        sa.Column("errors", sa.Integer(), nullable=False),
        sa.Column("submit_ms", sa.BigInteger(), nullable=False),
        sa.Column("polls", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("provider", "day", name=op.f("pk_provider_days")),
    )


def downgrade() -> None:
    op.drop_table("provider_days")
