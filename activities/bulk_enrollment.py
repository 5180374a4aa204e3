"""Bulk enrollment: fix a job's audience, then enroll it page by page.

Double enrollment is prevented twice over, on purpose. The per-job ledger
(``bulk_enrollment_items``, keyed (job, contact)) records each contact's outcome in the same
transaction that bumps the job's counts, and only while the outcome is still unset: a
retried page (a worker killed mid-page, Temporal's retry) skips everyone already done and
counts nobody twice, and the API reads exact progress from the job row. Under it, the
enrollment core (``activities.enrollments.enroll``: a row under a partial unique index, a
deterministic workflow id, USE_EXISTING) makes the one contact whose enrollment started
but whose ledger row was not yet written come back as the same enrollment, not a second
one. The ledger alone could not cover that gap, and the core alone could not tell this
job's enrollments from earlier ones, nor give counts.

The audience is a snapshot: a segment's members are copied into the ledger when the job
starts (one INSERT ... SELECT), so contacts entering the segment later join through the
segment trigger, not through this job, and the total is known up front.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.delivery import temporal_unavailable
from activities.enrollments import EnrollmentRefused, enroll
from models.campaigns import (
    BulkProgress,
    EnrollPageInput,
    EnrollPageResult,
    FinishBulkJobInput,
    FixBulkAudienceInput,
    FixBulkAudienceResult,
)
from models.db import session_scope
from models.tables import (
    BulkEnrollmentItem,
    BulkEnrollmentJob,
    BulkJobStatus,
    Contact,
    Journey,
    Segment,
    SegmentMember,
    utcnow,
)
from settings import Settings

log = logging.getLogger(__name__)
DATABASE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
_COUNTS = ("enrolled", "already_enrolled", "skipped", "failed")


def job_progress(job: BulkEnrollmentJob, cursor: str | None = None) -> BulkProgress:
    return BulkProgress(
        job_id=str(job.id),
        status=job.status,
        total=job.total,
        enrolled=job.enrolled,
        already_enrolled=job.already_enrolled,
        skipped=job.skipped,
        failed=job.failed,
        cursor=cursor,
        error=job.error,
    )


class BulkEnrollmentActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url

    @activity.defn(name="fix_bulk_audience")
    async def fix_bulk_audience(self, input: FixBulkAudienceInput) -> FixBulkAudienceResult:
        """Create the job row (a scheduled run's) and copy the segment's members into the
        ledger, once: one transaction, so a retry finds it all done or nothing done."""
        job_id = uuid.UUID(input.job_id)
        async with session_scope(self.database_url) as session:
            journey = (
                await session.exec(select(Journey).where(Journey.key == input.journey_key))
            ).first()
            if journey is None:
                raise ApplicationError(f"no journey {input.journey_key!r}", non_retryable=True)
            await session.exec(
                insert(BulkEnrollmentJob)
                .values(
                    id=job_id,
                    journey_id=journey.id,
                    source="segment" if input.segment_key else "list",
                    segment_key=input.segment_key,
                    schedule_id=uuid.UUID(input.schedule_id) if input.schedule_id else None,
                    workflow_id=input.workflow_id,
                    status=BulkJobStatus.running,
                    enrolled=0,
                    already_enrolled=0,
                    skipped=0,
                    failed=0,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing()
            )
            job = await session.get(BulkEnrollmentJob, job_id, with_for_update=True)
            assert job is not None
            if job.audience_fixed_at is None:
                if job.segment_key is not None:
                    segment = (
                        await session.exec(select(Segment).where(Segment.key == job.segment_key))
                    ).first()
                    if segment is None:
                        raise ApplicationError(
                            f"no segment {job.segment_key!r}", non_retryable=True
                        )
                    members = select(sa.literal(job_id, sa.Uuid), SegmentMember.contact_id).where(
                        SegmentMember.segment_id == segment.id
                    )
                    await (await session.connection()).execute(
                        insert(BulkEnrollmentItem)
                        .from_select(["job_id", "contact_id"], members)
                        .on_conflict_do_nothing()
                    )
                job.total = (
                    await session.exec(
                        select(sa.func.count()).where(BulkEnrollmentItem.job_id == job_id)
                    )
                ).one()
                job.audience_fixed_at = utcnow()
                session.add(job)
            assert job.total is not None
            return FixBulkAudienceResult(total=job.total)

    @activity.defn(name="enroll_bulk_page")
    async def enroll_bulk_page(self, input: EnrollPageInput) -> EnrollPageResult:
        """Enroll the next page of the ledger's pending contacts, ``concurrency`` at a time.

        Heartbeats carry the last contact id below which everything is done, so a retried
        attempt starts there (the ledger skips anyone done beyond it as well).
        """
        job_id = uuid.UUID(input.job_id)
        details = activity.info().heartbeat_details
        after = str(details[0]) if details and details[0] else input.after
        async with session_scope(self.database_url) as session:
            job = await session.get(BulkEnrollmentJob, job_id)
            if job is None:
                raise ApplicationError(f"no bulk enrollment job {job_id}", non_retryable=True)
            journey = await session.get(Journey, job.journey_id)
            assert journey is not None
            query = (
                select(BulkEnrollmentItem.contact_id)
                .where(BulkEnrollmentItem.job_id == job_id)
                .where(col(BulkEnrollmentItem.outcome).is_(None))
                .order_by(col(BulkEnrollmentItem.contact_id))
                .limit(input.page_size)
            )
            if after:
                query = query.where(col(BulkEnrollmentItem.contact_id) > uuid.UUID(after))
            contact_ids = list((await session.exec(query)).all())
        gate = asyncio.Semaphore(max(1, input.concurrency))
        finished = [False] * len(contact_ids)
        done_upto = after

        in_flight: set[asyncio.Task[None]] = set()

        async def one(index: int, contact_id: uuid.UUID) -> None:
            nonlocal done_upto
            async with gate:
                # Shielded: a contact whose enrollment began gets its ledger row even when
                # the page is cancelled meanwhile (the cancel below waits for it).
                task = asyncio.ensure_future(self._enroll_one(job, journey, contact_id))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                await asyncio.shield(task)
            finished[index] = True
            # Advance the resume point over the finished prefix only.
            advanced = None
            for position, ok in enumerate(finished):
                if not ok:
                    break
                advanced = position
            if advanced is not None:
                done_upto = str(contact_ids[advanced])
            activity.heartbeat(done_upto)

        try:
            outcomes = await asyncio.gather(
                *(one(i, c) for i, c in enumerate(contact_ids)), return_exceptions=True
            )
        except asyncio.CancelledError:
            # Contacts not begun are left pending; those under way finish and are recorded.
            if in_flight:
                await asyncio.wait(set(in_flight))
            raise
        crashed = [o for o in outcomes if isinstance(o, BaseException)]
        if crashed:
            raise crashed[0]  # the others finished and are in the ledger; a retry goes on
        async with session_scope(self.database_url) as session:
            refreshed = await session.get(BulkEnrollmentJob, job_id)
            assert refreshed is not None
            last = str(contact_ids[-1]) if contact_ids else after
            pending = (
                await session.exec(
                    select(BulkEnrollmentItem.contact_id)
                    .where(BulkEnrollmentItem.job_id == job_id)
                    .where(col(BulkEnrollmentItem.outcome).is_(None))
                    .limit(1)
                )
            ).first()
            return EnrollPageResult(
                last_contact_id=last,
                processed=len(contact_ids),
                done=pending is None,
                progress=job_progress(refreshed, last),
            )

    async def _enroll_one(
        self, job: BulkEnrollmentJob, journey: Journey, contact_id: uuid.UUID
    ) -> None:
        outcome, reason, enrollment_id = "failed", None, None
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, contact_id)
            if contact is None or contact.erased_at is not None:
                outcome, reason = "skipped", "contact erased"
            else:
                journey_row = await session.get(Journey, journey.id)
                assert journey_row is not None
                try:
                    enrollment, created = await enroll(
                        session,
                        activity.client(),
                        self.settings,
                        journey_row,
                        contact,
                        trigger={"bulk_enrollment": str(job.id)},
                    )
                except EnrollmentRefused as refused:
                    # The journey was stopped mid-job: nobody else can enter either.
                    raise ApplicationError(str(refused), non_retryable=True) from None
                except Exception as err:
                    if temporal_unavailable(err) or isinstance(err, DATABASE_ERRORS):
                        raise  # worth retrying: the activity's retry takes the page again
                    # Anything else is this contact's own problem: record it, go on.
                    await session.rollback()
                    outcome, reason = "failed", f"{type(err).__name__}: {err}"[:300]
                else:
                    enrollment_id = enrollment.id
                    # An earlier attempt of this page may have made it: still this job's.
                    ours = created or enrollment.started_at >= job.created_at
                    outcome = "enrolled" if ours else "already_enrolled"
                    if not ours:
                        reason = f"already {enrollment.status} since {enrollment.started_at}"
            await self._record(session, job.id, contact_id, outcome, reason, enrollment_id)

    async def _record(
        self,
        session: Any,
        job_id: uuid.UUID,
        contact_id: uuid.UUID,
        outcome: str,
        reason: str | None,
        enrollment_id: uuid.UUID | None,
    ) -> None:
        """Set the ledger row's outcome once, and count it in the same transaction."""
        connection = await session.connection()
        changed = await connection.execute(
            sa.update(BulkEnrollmentItem)
            .where(col(BulkEnrollmentItem.job_id) == job_id)
            .where(col(BulkEnrollmentItem.contact_id) == contact_id)
            .where(col(BulkEnrollmentItem.outcome).is_(None))
            .values(outcome=outcome, reason=reason, enrollment_id=enrollment_id, done_at=utcnow())
            .returning(col(BulkEnrollmentItem.contact_id))
        )
        if changed.first() is not None:
            assert outcome in _COUNTS
            column = getattr(BulkEnrollmentJob, outcome)
            await connection.execute(
                sa.update(BulkEnrollmentJob)
                .where(col(BulkEnrollmentJob.id) == job_id)
                .values({outcome: column + 1})
            )
        await session.commit()

    @activity.defn(name="finish_bulk_job")
    async def finish_bulk_job(self, input: FinishBulkJobInput) -> BulkProgress:
        """Close the job (the first end wins) and answer its final counts."""
        async with session_scope(self.database_url) as session:
            await (await session.connection()).execute(
                sa.update(BulkEnrollmentJob)
                .where(col(BulkEnrollmentJob.id) == uuid.UUID(input.job_id))
                .where(col(BulkEnrollmentJob.finished_at).is_(None))
                .values(status=input.status, error=input.error, finished_at=utcnow())
            )
            await session.commit()
            job = await session.get(BulkEnrollmentJob, uuid.UUID(input.job_id))
            if job is None:
                return BulkProgress(job_id=input.job_id, status=input.status, error=input.error)
            return job_progress(job)
