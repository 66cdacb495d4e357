"""money checks: counters, slots and budgets never go negative

Revision ID: 0004
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, constraint name under the metadata's naming convention, condition)
CHECKS = (
    ("tenants", "ck_tenants_in_flight_nonnegative", "in_flight >= 0"),
    ("tenants", "ck_tenants_budget_cents_nonnegative", "budget_cents >= 0"),
    ("api_keys", "ck_api_keys_budget_cents_nonnegative", "budget_cents >= 0"),
    ("budget_counters", "ck_budget_counters_spent_cents_nonnegative", "spent_cents >= 0"),
    ("budget_counters", "ck_budget_counters_reserved_cents_nonnegative", "reserved_cents >= 0"),
    ("rate_windows", "ck_rate_windows_count_nonnegative", "count >= 0"),
)


def upgrade() -> None:
    # Batch mode on SQLite rebuilds each table with its constraint (env.py turns foreign keys off for it).
    for table in dict.fromkeys(t for t, _, _ in CHECKS):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for _, name, condition in (c for c in CHECKS if c[0] == table):
                batch_op.create_check_constraint(op.f(name), condition)


def downgrade() -> None:
    for table in dict.fromkeys(t for t, _, _ in CHECKS):
        with op.batch_alter_table(table, schema=None) as batch_op:
            for _, name, _ in (c for c in CHECKS if c[0] == table):
                batch_op.drop_constraint(op.f(name), type_="check")
