"""secure aggregation: per-cluster groups, their members' public keys and the sealed shares

Revision ID: 0006_secagg
Revises: 0005_update_retention
Create Date: 2026-11-30 14:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006_secagg"
down_revision: str | None = "0005_update_retention"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

PHASES = ("keys", "shares", "masked", "unmasking", "ready", "failed")


def upgrade() -> None:
    op.create_table(
        "secagg_groups",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("round_id", sa.Integer(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=False),
        sa.Column("a_seed", sa.BigInteger(), nullable=False),
        sa.Column(
            "phase",
            sa.Enum(*PHASES, name="secagg_phase", native_enum=False, length=32),
            nullable=False,
        ),
        sa.Column("expected", sa.Integer(), nullable=False),
        sa.Column("threshold", sa.Integer(), nullable=True),
        sa.Column("waiting_since", sa.DateTime(timezone=True), nullable=False),
        sa.Column("error", sa.String(length=500), nullable=True),
        sa.ForeignKeyConstraint(
            ["round_id"],
            ["rounds.id"],
            name=op.f("fk_secagg_groups_round_id_rounds"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_groups")),
        sa.UniqueConstraint("round_id", "label", name=op.f("uq_secagg_groups_round_id_label")),
    )
    op.create_table(
        "secagg_members",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("client_id", sa.Integer(), nullable=False),
        sa.Column("c_public", sa.LargeBinary(), nullable=False),
        sa.Column("s_public", sa.LargeBinary(), nullable=False),
        sa.Column("share_index", sa.Integer(), nullable=True),
        sa.Column("shared_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("masked_key", sa.String(length=512), nullable=True),
        sa.Column("revealed", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["client_id"],
            ["clients.id"],
            name=op.f("fk_secagg_members_client_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["secagg_groups.id"],
            name=op.f("fk_secagg_members_group_id_secagg_groups"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_members")),
        sa.UniqueConstraint(
            "group_id", "client_id", name=op.f("uq_secagg_members_group_id_client_id")
        ),
    )
    op.create_table(
        "secagg_shares",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("group_id", sa.Integer(), nullable=False),
        sa.Column("sender_id", sa.Integer(), nullable=False),
        sa.Column("recipient_id", sa.Integer(), nullable=False),
        sa.Column("sealed", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["secagg_groups.id"],
            name=op.f("fk_secagg_shares_group_id_secagg_groups"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["recipient_id"],
            ["clients.id"],
            name=op.f("fk_secagg_shares_recipient_id_clients"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["sender_id"],
            ["clients.id"],
            name=op.f("fk_secagg_shares_sender_id_clients"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secagg_shares")),
        sa.UniqueConstraint(
            "group_id",
            "sender_id",
            "recipient_id",
            name=op.f("uq_secagg_shares_group_id_sender_id_recipient_id"),
        ),
    )
    op.create_index(
        "ix_secagg_shares_group_id_recipient_id",
        "secagg_shares",
        ["group_id", "recipient_id"],
    )


def downgrade() -> None:
    op.drop_index("ix_secagg_shares_group_id_recipient_id", table_name="secagg_shares")
    op.drop_table("secagg_shares")
    op.drop_table("secagg_members")
    op.drop_table("secagg_groups")
