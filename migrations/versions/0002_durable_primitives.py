"""Retries, timers, events, compensations and retention.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_TZ = sa.DateTime(timezone=True)
_INSTANCE_FK = (["tenant", "instance_id"], ["instances.tenant", "instances.id"])


def upgrade() -> None:
    for column in (
        sa.Column("attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("wait_kind", sa.Text(), nullable=True),
        sa.Column("wait_name", sa.Text(), nullable=True),
        sa.Column("wait_event", sa.Text(), nullable=True),
        sa.Column("wait_timeout_ms", sa.BigInteger(), nullable=True),
        sa.Column("wake_at", _TZ, nullable=True),
        sa.Column("wake_sent_at", _TZ, nullable=True),
        sa.Column("mode", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("end_status", sa.Text(), nullable=True),
        sa.Column("state_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("retention_seconds", sa.Integer(), nullable=True),
        sa.Column("finished_at", _TZ, nullable=True),
        sa.Column("retain_until", _TZ, nullable=True),
    ):
        op.add_column("instances", column)
    op.create_check_constraint(
        "ck_instances_wait_kind", "instances", "wait_kind IN ('sleep', 'retry', 'event')"
    )
    op.create_index(
        "ix_instances_wake_at",
        "instances",
        ["wake_at"],
        postgresql_where=sa.text("wake_at IS NOT NULL"),
    )
    op.create_index(
        "ix_instances_retain_until",
        "instances",
        ["retain_until"],
        postgresql_where=sa.text("retain_until IS NOT NULL"),
    )
    op.add_column(
        "journal", sa.Column("flags", sa.SmallInteger(), server_default="0", nullable=False)
    )
    op.create_table(
        "step_attempts",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("error", sa.Text(), nullable=False),
        sa.Column("started_at", _TZ, nullable=False),
        sa.Column("finished_at", _TZ, nullable=False),
        sa.ForeignKeyConstraint(
            *_INSTANCE_FK, name="fk_step_attempts_instances", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("tenant", "instance_id", "seq", "attempt", name="pk_step_attempts"),
    )
    op.create_table(
        "events",
        sa.Column("tenant", sa.Text(), nullable=False),
        sa.Column("instance_id", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Text(), nullable=False),
        sa.Column("type", sa.Text(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("received_at", _TZ, server_default=sa.text("now()"), nullable=False),
        sa.Column("consumed_seq", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(*_INSTANCE_FK, name="fk_events_instances", ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("tenant", "instance_id", "event_id", name="pk_events"),
    )
    op.create_index(
        "ix_events_waiting",
        "events",
        ["tenant", "instance_id", "type", "received_at"],
        postgresql_where=sa.text("consumed_seq IS NULL"),
    )


def downgrade() -> None:
    op.drop_table("events")
    op.drop_table("step_attempts")
    op.drop_column("journal", "flags")
    op.drop_index("ix_instances_retain_until", table_name="instances")
    op.drop_index("ix_instances_wake_at", table_name="instances")
    op.drop_constraint("ck_instances_wait_kind", "instances")
    for name in (
        "retain_until",
        "finished_at",
        "retention_seconds",
        "state_bytes",
        "end_status",
        "mode",
        "wake_sent_at",
        "wake_at",
        "wait_timeout_ms",
        "wait_event",
        "wait_name",
        "wait_kind",
        "attempt",
    ):
        op.drop_column("instances", name)
