"""at most one re-clustering job queued or running, held by the database (a partial unique index)

Two aggregator replicas' round loops could each queue a drift job in the same pass: the check
before the insert does not see the other's uncommitted row.

Revision ID: 0008_one_active_job
Revises: 0007_clustering_jobs
Create Date: 2026-11-30 19:00:00
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0008_one_active_job"
down_revision: str | None = "0007_clustering_jobs"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # One active job left by an earlier race would refuse the index: keep the oldest.
    op.execute(
        "UPDATE clustering_jobs SET state = 'failed', "
        "error = 'another re-clustering job was already queued or running' "
        "WHERE state IN ('queued', 'running') AND id > "
        "(SELECT MIN(id) FROM clustering_jobs WHERE state IN ('queued', 'running'))"
    )
    # The same constant (1) for every active row: a second one breaks uniqueness.
    op.execute(
        "CREATE UNIQUE INDEX ux_clustering_jobs_one_active ON clustering_jobs ((1)) "
        "WHERE state IN ('queued', 'running')"
    )


def downgrade() -> None:
    op.drop_index("ux_clustering_jobs_one_active", table_name="clustering_jobs")
