"""Request ids of mutating admin calls (AIP-155), see ``server.ledger.requests``.

* ``admin_requests``: one row per ``request_id``: the method, the request's hash and the
  response of the first call, written in the same transaction as the change.

Spelled out rather than built from ``server.ledger.schema``, like 0001.

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "admin_requests",
        sa.Column("request_id", sa.String(100), nullable=False),
        sa.Column("method", sa.String(100), nullable=False),
        sa.Column("request_hash", sa.String(64), nullable=False),
        sa.Column("response", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", name="pk_admin_requests"),
    )


def downgrade() -> None:
    op.drop_table("admin_requests")
