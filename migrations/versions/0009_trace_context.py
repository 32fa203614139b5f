"""The trace context an instance carries between its messages.

Each write of an instance's state keeps the trace context of the delivery that made it, so
the wake its timer loop sends later, and the steps operator actions queue, continue the
instance's trace (a workflow that sleeps a week is still one trace).

Revision ID: 0009_trace_context
Revises: 0008_stalled_instances
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009_trace_context"
down_revision = "0008_stalled_instances"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("instances", sa.Column("traceparent", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("instances", "traceparent")
