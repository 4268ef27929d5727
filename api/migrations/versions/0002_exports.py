"""Exports of succeeded jobs' trials: one row per export, claimed by runners as jobs are.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_LIVE = sa.text("state != 'failed'")


def upgrade() -> None:
    op.create_table(
        "bp_exports",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("job_id", sa.String(36), sa.ForeignKey("bp_jobs.id"), nullable=False),
        sa.Column("trial", sa.String(16), nullable=False),
        sa.Column("format", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("owner", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("report_json", sa.Text(), nullable=True),
        sa.Column("archive_bytes", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
    )
    op.create_index("ix_bp_exports_state_created", "bp_exports", ["state", "created_at"])
    op.create_index("ix_bp_exports_job_created", "bp_exports", ["job_id", "created_at"])
    # One export per (job, trial as asked, format) that has not failed; a failed one may be retried.
    op.create_index(
        "uq_bp_exports_live",
        "bp_exports",
        ["job_id", "trial", "format"],
        unique=True,
        sqlite_where=_LIVE,
        postgresql_where=_LIVE,
    )


def downgrade() -> None:
    op.drop_index("uq_bp_exports_live", table_name="bp_exports")
    op.drop_index("ix_bp_exports_job_created", table_name="bp_exports")
    op.drop_index("ix_bp_exports_state_created", table_name="bp_exports")
    op.drop_table("bp_exports")
