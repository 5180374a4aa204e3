"""split tests and assignments

Revision ID: 0009
Revises: 0007
Create Date: 2026-11-22 17:08:27.766036

"""

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel.sql.sqltypes
from alembic import op
from sqlalchemy.dialects import postgresql

# revision identifiers, used by Alembic.
revision: str = "0009"
down_revision: str | Sequence[str] | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        "split_tests",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("journey_key", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("step_id", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("metric", sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("winner", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
        sa.Column("p_value", sa.Float(), nullable=True),
        sa.Column("stats", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("decided_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_split_tests"),
        sa.UniqueConstraint("journey_key", "step_id", name="uq_split_tests"),
    )
    op.create_table(
        "split_assignments",
        sa.Column("split_test_id", sa.Uuid(), nullable=False),
        sa.Column("enrollment_id", sa.Uuid(), nullable=False),
        sa.Column("contact_id", sa.Uuid(), nullable=False),
        sa.Column("variant", sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
        sa.Column("assigned_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["contact_id"], ["contacts.id"], ondelete="CASCADE", name="fk_split_assignments_contact"
        ),
        sa.ForeignKeyConstraint(
            ["enrollment_id"],
            ["enrollments.id"],
            ondelete="CASCADE",
            name="fk_split_assignments_enrollment",
        ),
        sa.ForeignKeyConstraint(
            ["split_test_id"],
            ["split_tests.id"],
            ondelete="CASCADE",
            name="fk_split_assignments_split_test",
        ),
        sa.PrimaryKeyConstraint("split_test_id", "enrollment_id", name="pk_split_assignments"),
    )
    op.create_index(
        "ix_split_assignments_variant",
        "split_assignments",
        ["split_test_id", "variant", "assigned_at"],
        unique=False,
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_index("ix_split_assignments_variant", table_name="split_assignments")
    op.drop_table("split_assignments")
    op.drop_table("split_tests")
