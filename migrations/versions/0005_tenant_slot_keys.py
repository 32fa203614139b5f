"""A unique number per tenant for its running-step slots.

Slots were advisory locks keyed by a crc32 of the tenant name, so two tenants whose names
collide shared their slots; an identity column cannot collide.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Adding an identity column numbers the existing rows too.
    op.add_column(
        "tenants",
        sa.Column("slot_key", sa.Integer(), sa.Identity(always=False), nullable=False),
    )
    op.create_unique_constraint(op.f("uq_tenants_slot_key"), "tenants", ["slot_key"])


def downgrade() -> None:
    op.drop_constraint(op.f("uq_tenants_slot_key"), "tenants", type_="unique")
    op.drop_column("tenants", "slot_key")
