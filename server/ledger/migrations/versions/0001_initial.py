"""Initial ledger schema: accounts, API keys, reservations, ledger entries, usage records.

The tables are spelled out here rather than built from ``server.ledger.schema`` so that
this revision stays what it was when it shipped; a test compares the migrated database
with the metadata.

Revision ID: 0001
Revises:
Create Date: 2025-01-01 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_SERIAL = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
# Tables whose rows are facts: written once, never updated or deleted.
_APPEND_ONLY = ("ledger_entries", "usage_records")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("balance_micros", sa.BigInteger(), nullable=False),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False),
        sa.Column("credited_micros", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("balance_micros >= 0", name="ck_accounts_balance_not_negative"),
        sa.CheckConstraint("reserved_micros >= 0", name="ck_accounts_reserved_not_negative"),
        sa.CheckConstraint("spent_micros >= 0", name="ck_accounts_spent_not_negative"),
        sa.CheckConstraint("credited_micros >= 0", name="ck_accounts_credited_not_negative"),
        sa.PrimaryKeyConstraint("id", name="pk_accounts"),
        sa.UniqueConstraint("name", name="uq_accounts_name"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_api_keys_account_id_accounts"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
    )
    op.create_index("ix_api_keys_account_id", "api_keys", ["account_id"])
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("captured_micros", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.Column("closed_at", sa.BigInteger(), nullable=True),
        sa.CheckConstraint("amount_micros >= 0", name="ck_reservations_amount_not_negative"),
        sa.CheckConstraint(
            "captured_micros IS NULL OR (captured_micros >= 0 AND captured_micros <= amount_micros)",
            name="ck_reservations_captured_within_amount",
        ),
        sa.CheckConstraint("status IN ('open', 'settled', 'expired')", name="ck_reservations_status_known"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_reservations_account_id_accounts"),
        sa.PrimaryKeyConstraint("id", name="pk_reservations"),
    )
    op.create_index("ix_reservations_account_id", "reservations", ["account_id"])
    op.create_index("ix_reservations_status_expires_at", "reservations", ["status", "expires_at"])
    op.create_table(
        "ledger_entries",
        sa.Column("id", _SERIAL, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("reservation_id", sa.String(40), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("amount_micros >= 0", name="ck_ledger_entries_amount_not_negative"),
        sa.CheckConstraint(
            "kind IN ('credit', 'reserve', 'capture', 'release')", name="ck_ledger_entries_kind_known"
        ),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_ledger_entries_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["reservation_id"], ["reservations.id"], name="fk_ledger_entries_reservation_id_reservations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_ledger_entries"),
    )
    op.create_index("ix_ledger_entries_account_id", "ledger_entries", ["account_id"])
    op.create_index("ix_ledger_entries_reservation_id", "ledger_entries", ["reservation_id"])
    op.create_table(
        "usage_records",
        sa.Column("id", _SERIAL, autoincrement=True, nullable=False),
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("reservation_id", sa.String(40), nullable=False),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("images_requested", sa.Integer(), nullable=False),
        sa.Column("images_delivered", sa.Integer(), nullable=False),
        sa.Column("cost_micros", sa.BigInteger(), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("error_code", sa.String(100), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("cost_micros >= 0", name="ck_usage_records_cost_not_negative"),
        sa.CheckConstraint("status IN ('succeeded', 'failed')", name="ck_usage_records_status_known"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_usage_records_account_id_accounts"),
        sa.ForeignKeyConstraint(
            ["reservation_id"], ["reservations.id"], name="fk_usage_records_reservation_id_reservations"
        ),
        sa.PrimaryKeyConstraint("id", name="pk_usage_records"),
        sa.UniqueConstraint("reservation_id", name="uq_usage_records_reservation_id"),
    )
    op.create_index("ix_usage_records_account_id_id", "usage_records", ["account_id", "id"])

    # Append-only, enforced by the database itself: a bug (or an operator's stray
    # UPDATE) cannot rewrite history; corrections are new entries.
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            """
            CREATE FUNCTION imagegw_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only', TG_TABLE_NAME;
            END
            $$
            """
        )
        for table in _APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION imagegw_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION imagegw_refuse_change()"
            )
    else:
        for table in _APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_no_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
                )


def downgrade() -> None:
    for table in reversed(_APPEND_ONLY):
        if op.get_bind().dialect.name == "postgresql":
            op.execute(f"DROP TRIGGER IF EXISTS {table}_append_only ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_truncate ON {table}")
        else:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_update")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_no_delete")
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS imagegw_refuse_change()")
    for table in ("usage_records", "ledger_entries", "reservations", "api_keys", "accounts"):
        op.drop_table(table)
