"""queue (SPEC §12): queue_entries, queue_tenants, tenants.queue_weight and max_queued

Revision ID: 0012
Revises: 0008
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "queue_entries",
        sa.Column("prediction_id", sa.String(length=40), nullable=False),
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("model_id", sa.String(length=100), nullable=False),
        sa.Column("resolution", sa.String(length=16), nullable=False),
        sa.Column("duration", sa.Integer(), nullable=False),
        sa.Column("state", sa.String(length=8), nullable=False),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("lease_owner", sa.String(length=80), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["prediction_id"], ["predictions.id"], name=op.f("fk_queue_entries_prediction_id_predictions")
        ),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_queue_entries_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("prediction_id", name=op.f("pk_queue_entries")),
    )
    op.create_index(
        "ix_queue_entries_tenant_state_order",
        "queue_entries",
        ["tenant_id", "state", "enqueued_at", "prediction_id"],
    )
    op.create_index("ix_queue_entries_state_enqueued_at", "queue_entries", ["state", "enqueued_at"])
    op.create_index("ix_queue_entries_model_state", "queue_entries", ["model_id", "state"])
    op.create_table(
        "queue_tenants",
        sa.Column("tenant_id", sa.String(length=40), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("pass_", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("depth >= 0", name=op.f("ck_queue_tenants_depth_nonnegative")),
        sa.ForeignKeyConstraint(["tenant_id"], ["tenants.id"], name=op.f("fk_queue_tenants_tenant_id_tenants")),
        sa.PrimaryKeyConstraint("tenant_id", name=op.f("pk_queue_tenants")),
    )
    op.create_index("ix_queue_tenants_depth_pass", "queue_tenants", ["depth", "pass_"])
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.add_column(sa.Column("queue_weight", sa.Integer(), nullable=False, server_default="1"))
        batch_op.add_column(sa.Column("max_queued", sa.Integer(), nullable=False, server_default="1000"))


def downgrade() -> None:
    with op.batch_alter_table("tenants", schema=None) as batch_op:
        batch_op.drop_column("max_queued")
        batch_op.drop_column("queue_weight")
    op.drop_index("ix_queue_tenants_depth_pass", table_name="queue_tenants")
    op.drop_table("queue_tenants")
    op.drop_index("ix_queue_entries_model_state", table_name="queue_entries")
    op.drop_index("ix_queue_entries_state_enqueued_at", table_name="queue_entries")
    op.drop_index("ix_queue_entries_tenant_state_order", table_name="queue_entries")
    op.drop_table("queue_entries")
