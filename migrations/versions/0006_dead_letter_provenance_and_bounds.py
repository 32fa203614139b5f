"""Dead letters: who sent them as the broker vouches, bounded bodies, per-tenant usage.

Letters archived before this revision get `source` 'legacy' and no sender or first exchange:
nothing the broker vouched for was recorded about them, so they are never replayed. Their
sizes and hashes are computed from the bodies they kept, and they count against the tenant
their `x-tenant` header names.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add = op.add_column
    add("dead_letters", sa.Column("source", sa.Text(), server_default="legacy", nullable=False))
    add("dead_letters", sa.Column("sender", sa.Text(), nullable=True))
    add("dead_letters", sa.Column("first_exchange", sa.Text(), nullable=True))
    add("dead_letters", sa.Column("account", sa.Text(), server_default="", nullable=False))
    add("dead_letters", sa.Column("body_size", sa.BigInteger(), nullable=True))
    add("dead_letters", sa.Column("body_sha256", sa.Text(), nullable=True))
    add("dead_letters", sa.Column("stored_bytes", sa.BigInteger(), nullable=True))
    add("dead_letters", sa.Column("unreplayable", sa.Text(), nullable=True))
    op.execute(
        """
        UPDATE dead_letters
        SET account = coalesce(tenant, ''),
            body_size = octet_length(body),
            body_sha256 = encode(sha256(body), 'hex'),
            stored_bytes = octet_length(body) + octet_length(headers)
        """
    )
    for column in ("body_size", "body_sha256", "stored_bytes"):
        op.alter_column("dead_letters", column, nullable=False)
    op.create_table(
        "dead_letter_usage",
        sa.Column("account", sa.Text(), nullable=False),
        sa.Column("letters", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("account", name="pk_dead_letter_usage"),
    )
    op.execute(
        """
        INSERT INTO dead_letter_usage (account, letters, bytes)
        SELECT account, count(*), sum(stored_bytes) FROM dead_letters GROUP BY account
        """
    )


def downgrade() -> None:
    op.drop_table("dead_letter_usage")
    for column in (
        "unreplayable",
        "stored_bytes",
        "body_sha256",
        "body_size",
        "account",
        "first_exchange",
        "sender",
        "source",
    ):
        op.drop_column("dead_letters", column)
