"""API tokens, and the indexes the HTTP API and console list and page by.

`api_tokens` holds each token's name, role, optional tenant and the SHA-256 of its secret
(the secret itself is shown once and never stored). The instance indexes serve the listings
newest first with a cursor, across tenants and within one; the BRIN index on the journal's
finish time serves the steps-per-second figure at almost no cost to the per-step insert.

Revision ID: 0010_api_tokens
Revises: 0009_trace_context
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010_api_tokens"
down_revision = "0009_trace_context"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("tenant", sa.Text(), nullable=True),
        sa.Column("secret_sha256", sa.Text(), nullable=False),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False
        ),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "role IN ('viewer', 'operator', 'admin')", name=op.f("ck_api_tokens_role")
        ),
        sa.PrimaryKeyConstraint("name", name="pk_api_tokens"),
        sa.UniqueConstraint("secret_sha256", name="uq_api_tokens_secret_sha256"),
    )
    op.create_index(
        "ix_instances_tenant_created_at_id", "instances", ["tenant", "created_at", "id"]
    )
    op.create_index(
        "ix_instances_created_at_tenant_id", "instances", ["created_at", "tenant", "id"]
    )
    op.create_index("ix_journal_finished_at", "journal", ["finished_at"], postgresql_using="brin")


def downgrade() -> None:
    op.drop_index("ix_journal_finished_at", table_name="journal")
    op.drop_index("ix_instances_created_at_tenant_id", table_name="instances")
    op.drop_index("ix_instances_tenant_created_at_id", table_name="instances")
    op.drop_table("api_tokens")
