"""audience: segments, scoring, crm sync

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 16:04:32.508834

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "scoring_models",
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("document", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key"),
    )
    op.create_table(
        "segments",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("name", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
        sa.Column("description", sqlmodel.sql.sqltypes.AutoString(), nullable=True),
        sa.Column("condition", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("refreshed_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("key"),
    )
    op.create_table(
        "segment_members",
        sa.Column("segment_id", sa.Uuid(), nullable=False),
        sa.Column("contact_id", sa.Uuid(), nullable=False),
        sa.Column("entered_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["contact_id"], ["contacts.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["segment_id"], ["segments.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("segment_id", "contact_id"),
    )
    op.create_index("ix_segment_members_contact", "segment_members", ["contact_id"], unique=False)
    op.add_column(
        "contacts", sa.Column("score_adjustment", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "contacts", sa.Column("crm_id", sqlmodel.sql.sqltypes.AutoString(length=100), nullable=True)
    )
    op.add_column("contacts", sa.Column("merged_into", sa.Uuid(), nullable=True))
    op.create_foreign_key(
        "fk_contacts_merged_into", "contacts", "contacts", ["merged_into"], ["id"]
    )
    # Existing scores were all adjustments: no scoring rules existed before.
    op.execute("UPDATE contacts SET score_adjustment = score")
    op.add_column(
        "crm_tasks",
        sa.Column("external_id", sqlmodel.sql.sqltypes.AutoString(length=200), nullable=True),
    )
    op.add_column("crm_tasks", sa.Column("synced_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column(
        "crm_tasks", sa.Column("sync_attempts", sa.Integer(), server_default="0", nullable=False)
    )
    op.add_column(
        "crm_tasks", sa.Column("sync_error", sqlmodel.sql.sqltypes.AutoString(), nullable=True)
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_column("crm_tasks", "sync_error")
    op.drop_column("crm_tasks", "sync_attempts")
    op.drop_column("crm_tasks", "synced_at")
    op.drop_column("crm_tasks", "external_id")
    op.drop_constraint("fk_contacts_merged_into", "contacts", type_="foreignkey")
    op.drop_column("contacts", "merged_into")
    op.drop_column("contacts", "crm_id")
    op.drop_column("contacts", "score_adjustment")
    op.drop_index("ix_segment_members_contact", table_name="segment_members")
    op.drop_table("segment_members")
    op.drop_table("segments")
    op.drop_table("scoring_models")
