"""Tenants: broker identity, per-tenant limits and rates, egress allow list and secrets.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


# 0001 and 0002 passed full names to a metadata naming convention, which prefixed them again
# (ck_instances_ck_instances_status); give the check constraints the names tables.py uses.
_DOUBLED = ("status", "position")


def upgrade() -> None:
    for name in _DOUBLED:
        op.execute(
            f"ALTER TABLE instances RENAME CONSTRAINT ck_instances_ck_instances_{name} "
            f"TO ck_instances_{name}"
        )
    op.drop_constraint(op.f("ck_instances_ck_instances_wait_kind"), "instances", type_="check")
    op.create_check_constraint(
        op.f("ck_instances_wait_kind"),
        "instances",
        "wait_kind IN ('sleep', 'retry', 'event', 'throttle')",
    )
    op.create_table(
        "tenant_rates",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("tokens", sa.Float(), nullable=False),
        sa.Column("updated_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_tenant_rates"),
    )
    op.create_table(
        "tenants",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("broker_user", sa.Text(), nullable=True),
        sa.Column("limits", sa.Text(), server_default="{}", nullable=False),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
        sa.UniqueConstraint("broker_user", name="uq_tenants_broker_user"),
    )
    op.create_table(
        "tenant_egress",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant"], ["tenants.name"], name="fk_tenant_egress_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant", "host", name="pk_tenant_egress"),
    )
    op.create_table(
        "tenant_secrets",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("header", sa.Text(), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant"], ["tenants.name"], name="fk_tenant_secrets_tenants", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant", "name", name="pk_tenant_secrets"),
    )


def downgrade() -> None:
    op.drop_table("tenant_rates")
    op.drop_constraint(op.f("ck_instances_wait_kind"), "instances", type_="check")
    op.create_check_constraint(
        op.f("ck_instances_ck_instances_wait_kind"),
        "instances",
        "wait_kind IN ('sleep', 'retry', 'event')",
    )
    for name in _DOUBLED:
        op.execute(
            f"ALTER TABLE instances RENAME CONSTRAINT ck_instances_{name} "
            f"TO ck_instances_ck_instances_{name}"
        )
    op.drop_table("tenant_secrets")
    op.drop_table("tenant_egress")
    op.drop_table("tenants")
