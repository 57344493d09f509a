"""Idempotency keys, per-key rate-limit counters, and per-account rate-limit overrides.

* ``idempotency_keys``: one row per (account, Idempotency-Key), see ``server.idempotency``.
* ``rate_limit_counters``: one row per API key, its current one-minute window, see
  ``server.ratelimit``.
* ``accounts.rate_limit_rpm`` / ``accounts.rate_limit_ipm``: nullable overrides of the
  server's default limits (NULL: the default; 0: unlimited).

Spelled out rather than built from ``server.ledger.schema``, like 0001.

Revision ID: 0002
Revises: 0001
Create Date: 2025-01-02 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Nullable columns without defaults: a plain ALTER TABLE ADD COLUMN on both engines.
    op.add_column("accounts", sa.Column("rate_limit_rpm", sa.Integer(), nullable=True))
    op.add_column("accounts", sa.Column("rate_limit_ipm", sa.Integer(), nullable=True))
    op.create_table(
        "rate_limit_counters",
        sa.Column("key_id", sa.String(40), nullable=False),
        sa.Column("window_start", sa.BigInteger(), nullable=False),
        sa.Column("requests", sa.Integer(), nullable=False),
        sa.Column("images", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name="fk_rate_limit_counters_key_id_api_keys"),
        sa.PrimaryKeyConstraint("key_id", name="pk_rate_limit_counters"),
    )
    op.create_table(
        "idempotency_keys",
        sa.Column("account_id", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("owner", sa.String(40), nullable=True),
        sa.Column("locked_until", sa.BigInteger(), nullable=True),
        sa.Column("request_id", sa.String(255), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column("response_headers", sa.Text(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("expires_at", sa.BigInteger(), nullable=False),
        sa.CheckConstraint("state IN ('in_progress', 'completed')", name="ck_idempotency_keys_state_known"),
        sa.ForeignKeyConstraint(["account_id"], ["accounts.id"], name="fk_idempotency_keys_account_id_accounts"),
        sa.PrimaryKeyConstraint("account_id", "idempotency_key", name="pk_idempotency_keys"),
    )
    op.create_index("ix_idempotency_keys_expires_at", "idempotency_keys", ["expires_at"])


def downgrade() -> None:
    op.drop_index("ix_idempotency_keys_expires_at", table_name="idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_table("rate_limit_counters")
    # ALTER TABLE DROP COLUMN: PostgreSQL, and SQLite since 3.35 (no index or constraint
    # refers to these columns).
    op.drop_column("accounts", "rate_limit_ipm")
    op.drop_column("accounts", "rate_limit_rpm")
