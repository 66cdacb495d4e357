"""providers (SPEC §11): provider_states, a prediction's provider and provider-side reference, the
provider on ledger rows

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "provider_states",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("disabled", sa.Boolean(), nullable=False),
        sa.Column("disabled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("disabled_by", sa.String(length=200), nullable=True),
        sa.Column("in_flight", sa.Integer(), nullable=False),
        sa.Column("cooldown_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cooldown_reason", sa.String(length=200), nullable=True),
        sa.Column("failures", sa.Integer(), nullable=False),
        sa.Column("circuit_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("probe_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("last_error_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.CheckConstraint("in_flight >= 0", name=op.f("ck_provider_states_in_flight_nonnegative")),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_provider_states")),
    )
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("upstream_ref", sa.JSON(none_as_null=True), nullable=True))
        batch_op.add_column(sa.Column("holds_provider_slot", sa.Boolean(), nullable=False, server_default=sa.false()))
    # Everything so far came from the one provider of today's settings.
    op.execute("UPDATE predictions SET provider = 'vibedream' WHERE upstream_id IS NOT NULL")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.alter_column("holds_provider_slot", server_default=None)
        batch_op.drop_constraint("uq_predictions_upstream_id", type_="unique")
        batch_op.create_unique_constraint("uq_predictions_provider_upstream_id", ["provider", "upstream_id"])
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=True))
    with op.batch_alter_table("output_copies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("provider", sa.String(length=32), nullable=True))
    op.execute("UPDATE output_copies SET provider = 'vibedream'")
    op.execute(
        "UPDATE ledger_entries SET provider = 'vibedream' WHERE kind IN ('settle', 'refund') AND prediction_id IS NOT NULL"
    )


def downgrade() -> None:
    with op.batch_alter_table("output_copies", schema=None) as batch_op:
        batch_op.drop_column("provider")
    with op.batch_alter_table("ledger_entries", schema=None) as batch_op:
        batch_op.drop_column("provider")
    with op.batch_alter_table("predictions", schema=None) as batch_op:
        batch_op.drop_constraint("uq_predictions_provider_upstream_id", type_="unique")
        batch_op.create_unique_constraint("uq_predictions_upstream_id", ["upstream_id"])
        batch_op.drop_column("holds_provider_slot")
        batch_op.drop_column("upstream_ref")
        batch_op.drop_column("provider")
    op.drop_table("provider_states")
