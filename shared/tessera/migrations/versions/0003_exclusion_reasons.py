"""why an update was excluded, and a round's aggregation report

Revision ID: 0003_exclusions
Revises: 0002
Create Date: 2026-11-30 10:40:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_exclusions"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("exclusion_reason", sa.String(length=500), nullable=True))
    with op.batch_alter_table("rounds") as batch:
        batch.add_column(sa.Column("report", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("rounds") as batch:
        batch.drop_column("report")
    with op.batch_alter_table("updates") as batch:
        batch.drop_column("exclusion_reason")
