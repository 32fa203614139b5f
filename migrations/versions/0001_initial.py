"""Modules, instances, journal and outbox.

Revision ID: 0001
Revises:
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "modules",
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("wasm", sa.LargeBinary(), nullable=False),
        sa.Column("size_bytes", sa.Integer(), nullable=False),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("digest", name="pk_modules"),
    )
    op.create_table(
        "tenant_modules",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("digest", sa.Text(), nullable=False),
        sa.Column("pushed_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(["digest"], ["modules.digest"], name="fk_tenant_modules_modules"),
        sa.PrimaryKeyConstraint("tenant", "digest", name="pk_tenant_modules"),
    )
    op.create_table(
        "instances",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("module", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("position", sa.Integer(), server_default="0", nullable=False),
        sa.Column("generation", sa.Integer(), server_default="0", nullable=False),
        sa.Column("params", sa.Text(), nullable=False),
        sa.Column("output", sa.Text(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'waiting', 'sleeping', 'paused', 'errored', "
            "'terminated', 'complete')",
            name="ck_instances_status",
        ),
        sa.CheckConstraint("position >= 0", name="ck_instances_position"),
        sa.ForeignKeyConstraint(["module"], ["modules.digest"], name="fk_instances_modules"),
        sa.PrimaryKeyConstraint("tenant", "id", name="pk_instances"),
    )
    op.create_index("ix_instances_tenant_status", "instances", ["tenant", "status"])
    op.create_table(
        "journal",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.SmallInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("started_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant", "instance_id"],
            ["instances.tenant", "instances.id"],
            name="fk_journal_instances",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant", "instance_id", "seq", name="pk_journal"),
    )
    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("routing_key", sa.Text(), nullable=False),
        sa.Column("headers", sa.Text(), nullable=False),
        sa.Column("body", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
    )
    op.create_index("ix_outbox_created_at", "outbox", ["created_at"])


def downgrade() -> None:
    op.drop_table("outbox")
    op.drop_table("journal")
    op.drop_index("ix_instances_tenant_status", table_name="instances")
    op.drop_table("instances")
    op.drop_table("tenant_modules")
    op.drop_table("modules")
