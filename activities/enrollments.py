"""Activities that record an enrollment's life in the database."""

from __future__ import annotations

import uuid

from sqlmodel import col, update
from temporalio import activity

from models.contracts import FinishEnrollmentInput
from models.db import session_scope
from models.tables import Enrollment, EnrollmentStatus, utcnow


class EnrollmentActivities:
    def __init__(self, database_url: str | None = None) -> None:
        self.database_url = database_url

    @activity.defn(name="finish_enrollment")
    async def finish_enrollment(self, input: FinishEnrollmentInput) -> None:
        """Mark the enrollment ended; idempotent (an ended enrollment keeps its first end)."""
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(Enrollment)
                .where(col(Enrollment.id) == uuid.UUID(input.enrollment_id))
                .where(col(Enrollment.status) == EnrollmentStatus.active)
                .values(
                    status=EnrollmentStatus(input.status),
                    exit_reason=input.exit_reason,
                    ended_at=utcnow(),
                )
            )
