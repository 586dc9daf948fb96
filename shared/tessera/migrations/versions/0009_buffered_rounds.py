"""buffered rounds: a device's several updates in one round, an adapter's several versions

A buffered round publishes a cluster's adapter every buffer_k updates while it collects, and a
device uploads once per local round: updates are unique per (client, round, seq) and versions
per (adapter, round, flush), 0 in sync rounds as before.

Revision ID: 0009_buffered_rounds
Revises: 0008_one_active_job
Create Date: 2026-11-30 20:30:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_buffered_rounds"
down_revision: str | None = "0008_one_active_job"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("updates") as batch:
        batch.add_column(sa.Column("seq", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_updates_client_id_round_id", type_="unique")
        batch.create_unique_constraint(
            "uq_updates_client_id_round_id_seq", ["client_id", "round_id", "seq"]
        )
    with op.batch_alter_table("adapter_versions") as batch:
        batch.add_column(sa.Column("flush", sa.Integer(), nullable=False, server_default="0"))
        batch.drop_constraint("uq_adapter_versions_adapter_id_round_id", type_="unique")
        batch.create_unique_constraint(
            "uq_adapter_versions_adapter_id_round_id_flush", ["adapter_id", "round_id", "flush"]
        )


def downgrade() -> None:
    # Refused (by the old unique constraints) while a buffered round's rows remain.
    with op.batch_alter_table("adapter_versions") as batch:
        batch.drop_constraint("uq_adapter_versions_adapter_id_round_id_flush", type_="unique")
        batch.create_unique_constraint(
            "uq_adapter_versions_adapter_id_round_id", ["adapter_id", "round_id"]
        )
        batch.drop_column("flush")
    with op.batch_alter_table("updates") as batch:
        batch.drop_constraint("uq_updates_client_id_round_id_seq", type_="unique")
        batch.create_unique_constraint("uq_updates_client_id_round_id", ["client_id", "round_id"])
        batch.drop_column("seq")
