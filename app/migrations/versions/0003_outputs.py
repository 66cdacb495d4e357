"""outputs: copy jobs, stored files, per-tenant retention

Revision ID: 0003
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
# 0002 (dashboard) is on another branch; the chain is fixed when both are merged.
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "output_copies",
        sa.Column("prediction_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("sources", sa.JSON(), nullable=False),
        sa.Column("link_base", sa.String(length=2048), nullable=False),
        sa.Column("vendor_completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("model_name", sa.String(length=200), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("lease_owner", sa.String(length=80), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.String(length=500), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("stored_bytes", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_output_copies_prediction_id_predictions")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_output_copies_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("prediction_id", name=op.f("pk_output_copies")),
    )
    with op.batch_alter_table("output_copies", schema=None) as batch_op:
        batch_op.create_index("ix_output_copies_due", ["status", "next_attempt_at"], unique=False)
        batch_op.create_index("ix_output_copies_tenant_id_status", ["tenant_id", "status"], unique=False)

    op.create_table(
        "stored_outputs",
        sa.Column("prediction_id", sa.String(length=40), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=40), nullable=False),
        sa.Column("source_url", sa.String(length=2048), nullable=False),
        sa.Column("key", sa.String(length=300), nullable=False),
        sa.Column("content_type", sa.String(length=100), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("stored_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"],
            ["output_copies.prediction_id"],
            name=op.f("fk_stored_outputs_prediction_id_output_copies"),
        ),
        sa.PrimaryKeyConstraint("prediction_id", "position", name=op.f("pk_stored_outputs")),
    )

    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("output_retention_days", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("output_retention_days")
    op.drop_table("stored_outputs")
    with op.batch_alter_table("output_copies", schema=None) as batch_op:
        batch_op.drop_index("ix_output_copies_tenant_id_status")
        batch_op.drop_index("ix_output_copies_due")
    op.drop_table("output_copies")
