"""generation jobs that run together: batch key and leader

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 03:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("generation_jobs") as batch:
        batch.add_column(sa.Column("batch_key", sa.String(length=64), nullable=True))
        batch.add_column(sa.Column("batch_leader", sa.String(length=36), nullable=True))
        batch.create_index("ix_generation_jobs_state_batch_key", ["state", "batch_key"])


def downgrade() -> None:
    with op.batch_alter_table("generation_jobs") as batch:
        batch.drop_index("ix_generation_jobs_state_batch_key")
        batch.drop_column("batch_leader")
        batch.drop_column("batch_key")
