"""Early events: events that arrive before their instance exists, held for its create.

Revision ID: 0007_early_events
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007_early_events"
down_revision = "0006"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "early_events",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("received_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", _TZ, nullable=False),
        sa.Column("letter_exchange", sa.Text(), nullable=False),
        sa.Column("letter_routing_key", sa.Text(), nullable=False),
        sa.Column("letter_headers", sa.Text(), nullable=False),
        sa.Column("letter_body", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "instance_id", "event_id", name="pk_early_events"),
    )
    op.create_index("ix_early_events_expires_at", "early_events", ["expires_at"])


def downgrade() -> None:
    op.drop_table("early_events")
