"""Stalled instances: the dead letter that left an instance with nothing to move it, and when
the stall sweep last republished an instance's step.

`stalled_letter`, `stalled_reason` and `stalled_at` are set by the dead-letter archiver when
a step or wake of a live instance, for the position the instance is at, is dead-lettered; any
step the instance takes, a replay of that letter, and retry, terminate, restart and resume
clear them. `swept_at` is when the stall sweep last republished the instance's step message.
The partial index `ix_instances_unparked` serves the sweep: live instances that are not parked
on a timer. It is keyed by the primary key's columns, not `updated_at`: a write from one step
to the next changes none of its columns, so it stays a HOT update.

Revision ID: 0008_stalled_instances
Revises: 0007_early_events
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008_stalled_instances"
down_revision = "0007_early_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    add = op.add_column
    add("instances", sa.Column("stalled_letter", sa.BigInteger(), nullable=True))
    add("instances", sa.Column("stalled_reason", sa.Text(), nullable=True))
    add("instances", sa.Column("stalled_at", sa.DateTime(timezone=True), nullable=True))
    add("instances", sa.Column("swept_at", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_instances_unparked",
        "instances",
        ["tenant", "id"],
        postgresql_where=sa.text("wait_kind IS NULL AND status IN ('queued', 'running')"),
    )
    op.create_index(
        "ix_instances_stalled_letter",
        "instances",
        ["stalled_letter"],
        postgresql_where=sa.text("stalled_letter IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_instances_stalled_letter", table_name="instances")
    op.drop_index("ix_instances_unparked", table_name="instances")
    for column in ("swept_at", "stalled_at", "stalled_reason", "stalled_letter"):
        op.drop_column("instances", column)
