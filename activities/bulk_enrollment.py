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
from collections import Counter
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from temporalio import activity
from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.exceptions import ApplicationError
from temporalio.service import RPCError

from activities.delivery import temporal_unavailable
from activities.enrollments import (
    EnrollmentRefused,
    cooling_down,
    current_version,
    new_enrollment_values,
    parsed_version,
    refuse_closed,
    start_run,
)
from activities.snapshots import contact_snapshots
from models.campaigns import (
    BulkProgress,
    EnrollPageInput,
    EnrollPageResult,
    FinishBulkJobInput,
    FixBulkAudienceInput,
    FixBulkAudienceResult,
)
from models.db import session_scope
from models.listening import listening_of
from models.tables import (
    BulkEnrollmentItem,
    BulkEnrollmentJob,
    BulkJobStatus,
    Contact,
    Enrollment,
    EnrollmentStatus,
    Journey,
    JourneyVersion,
    Segment,
    SegmentMember,
    utcnow,
)
from settings import Settings

log = logging.getLogger(__name__)
DATABASE_ERRORS = (sa.exc.OperationalError, sa.exc.InterfaceError, sa.exc.TimeoutError)
_COUNTS = ("enrolled", "already_enrolled", "skipped", "failed")
# A page works in chunks of this many times its concurrency: one insert and one ledger
# update per chunk; a cancel waits for at most one chunk.
CHUNK_PER_CONCURRENCY = 4


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
        """Enroll the next page of the ledger's pending contacts, in chunks: each chunk's
        enrollment rows in one INSERT, their journeys started ``concurrency`` at a time, and
        their outcomes and counts in one transaction.

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
        concurrency = max(1, input.concurrency)
        size = concurrency * CHUNK_PER_CONCURRENCY
        done_upto = after
        for first in range(0, len(contact_ids), size):
            chunk = contact_ids[first : first + size]
            await self._at_workers_pace(done_upto)
            # Shielded: a chunk whose enrollments began is finished and recorded even when
            # the page is cancelled meanwhile; contacts in later chunks stay pending.
            work = asyncio.ensure_future(self._enroll_chunk(job, chunk, concurrency))
            try:
                await asyncio.shield(work)
            except asyncio.CancelledError:
                await asyncio.wait({work})
                raise
            done_upto = str(chunk[-1])
            activity.heartbeat(done_upto)
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

    async def _at_workers_pace(self, done_upto: str | None) -> None:
        """Wait while the journeys' task queue holds more than ``bulk_enroll_max_backlog``
        workflow tasks no worker has taken yet (its approximate backlog, from Temporal).

        Starting a run is cheaper than its first task: unpaced, a job of 100,000 queued
        first tasks faster than the worker took them, and every other journey's next step
        (its own workflow's too) waited behind them. A server that reports no statistics
        leaves the job unpaced."""
        limit = self.settings.bulk_enroll_max_backlog
        if limit <= 0:
            return
        client = activity.client()
        request = DescribeTaskQueueRequest(
            namespace=client.namespace,
            task_queue=TaskQueue(name=self.settings.task_queue),
            task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            report_stats=True,
        )
        pause = 0.05
        while True:
            try:
                described = await client.workflow_service.describe_task_queue(request)
            except RPCError as err:
                log.debug("no task queue statistics (%s): bulk enrollment unpaced", err)
                return
            if described.stats.approximate_backlog_count <= limit:
                return
            activity.heartbeat(done_upto)
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _enroll_chunk(
        self, job: BulkEnrollmentJob, contact_ids: list[uuid.UUID], concurrency: int
    ) -> None:
        """Enroll these contacts: the enrollment core's rules (one active run per journey
        and contact, the re-entry policy, rows committed before their runs start), with one
        statement per step for the whole chunk instead of one per contact."""
        outcomes: dict[uuid.UUID, tuple[str, str | None, uuid.UUID | None]] = {}
        async with session_scope(self.database_url) as session:
            journey = await session.get(Journey, job.journey_id)
            assert journey is not None
            try:
                refuse_closed(journey)
            except EnrollmentRefused as refused:
                # The journey was stopped mid-job: nobody else can enter either.
                raise ApplicationError(str(refused), non_retryable=True) from None
            version = await current_version(session, journey)
            document = parsed_version(version)
            contacts = {
                contact.id: contact
                for contact in (
                    await session.exec(select(Contact).where(col(Contact.id).in_(contact_ids)))
                ).all()
                if contact.erased_at is None
            }
            latest = await self._latest(session, journey.id, list(contacts))
            # (enrollment, its version, whether it re-enters) for each run to start.
            starts: list[tuple[Enrollment, JourneyVersion, bool]] = []
            rows: list[dict[str, Any]] = []
            for contact_id in contact_ids:
                previous = latest.get(contact_id)
                if contact_id not in contacts:
                    outcomes[contact_id] = ("skipped", "contact erased", None)
                elif previous is not None and (
                    previous.status == EnrollmentStatus.active or cooling_down(document, previous)
                ):
                    outcomes[contact_id] = self._existing(job, previous)
                    if previous.status == EnrollmentStatus.active and previous.run_id is None:
                        # An earlier attempt stored the row; its run may not have started.
                        started_on = await session.get(JourneyVersion, previous.journey_version_id)
                        assert started_on is not None
                        starts.append((previous, started_on, False))
                else:
                    rows.append(
                        new_enrollment_values(
                            journey,
                            version,
                            contact_id,
                            trigger={"bulk_enrollment": str(job.id)},
                        )
                    )
            if rows:
                connection = await session.connection()
                inserted = set(
                    (
                        await connection.execute(
                            insert(Enrollment)
                            .values(rows)
                            .on_conflict_do_nothing()
                            .returning(col(Enrollment.contact_id))
                        )
                    ).scalars()
                )
                await session.commit()
                raced = [row["contact_id"] for row in rows if row["contact_id"] not in inserted]
                # Enrolled by someone else between the read and the insert: theirs to start.
                for contact_id, previous in (
                    await self._latest(session, journey.id, raced)
                ).items():
                    outcomes[contact_id] = self._existing(job, previous)
                for row in rows:
                    if row["contact_id"] in inserted:
                        enrollment = Enrollment(**row)
                        outcomes[row["contact_id"]] = ("enrolled", None, enrollment.id)
                        starts.append(
                            (enrollment, version, latest.get(row["contact_id"]) is not None)
                        )
            views = await contact_snapshots(
                session,
                [contacts[enrollment.contact_id] for enrollment, _, _ in starts],
                with_segments=bool(listening_of(document).segments),
            )
            gate = asyncio.Semaphore(concurrency)
            temporal = activity.client()

            async def start(
                enrollment: Enrollment, started_on: JourneyVersion, reentry: bool
            ) -> str | None:
                async with gate:
                    return await start_run(
                        temporal, self.settings, journey, started_on, enrollment,
                        views[enrollment.contact_id], None, reentry=reentry, eager=True,
                    )  # fmt: skip

            results = await asyncio.gather(
                *(start(*each) for each in starts), return_exceptions=True
            )
            run_ids: list[dict[str, Any]] = []
            unstartable: list[uuid.UUID] = []
            retry: BaseException | None = None
            for (enrollment, _, _), result in zip(starts, results, strict=True):
                if isinstance(result, asyncio.CancelledError):
                    raise result
                if isinstance(result, BaseException):
                    if temporal_unavailable(result) or isinstance(result, DATABASE_ERRORS):
                        # Worth retrying: the page's retry finds the row and starts it.
                        outcomes.pop(enrollment.contact_id, None)
                        retry = retry or result
                        continue
                    # This contact's own problem: record it and end the row, so no drain
                    # starts it later.
                    reason = f"{type(result).__name__}: {result}"[:300]
                    outcomes[enrollment.contact_id] = ("failed", reason, enrollment.id)
                    unstartable.append(enrollment.id)
                elif result:
                    run_ids.append({"enrollment_id": enrollment.id, "run_id": result})
            await self._record(session, job.id, outcomes, run_ids, unstartable)
        if retry is not None:
            raise retry

    @staticmethod
    async def _latest(
        session: Any, journey_id: uuid.UUID, contact_ids: list[uuid.UUID]
    ) -> dict[uuid.UUID, Enrollment]:
        """Each contact's latest enrollment (key value '') in the journey."""
        if not contact_ids:
            return {}
        rows = (
            await session.exec(
                select(Enrollment)
                .where(Enrollment.journey_id == journey_id)
                .where(col(Enrollment.contact_id).in_(contact_ids))
                .where(Enrollment.run_key == "")
                .order_by(col(Enrollment.started_at))
            )
        ).all()
        return {row.contact_id: row for row in rows}  # the latest of each contact's runs wins

    @staticmethod
    def _existing(
        job: BulkEnrollmentJob, enrollment: Enrollment
    ) -> tuple[str, str | None, uuid.UUID | None]:
        # An earlier attempt of this page may have made it: still this job's.
        if enrollment.started_at >= job.created_at:
            return "enrolled", None, enrollment.id
        return (
            "already_enrolled",
            f"already {enrollment.status} since {enrollment.started_at}",
            enrollment.id,
        )

    async def _record(
        self,
        session: Any,
        job_id: uuid.UUID,
        outcomes: dict[uuid.UUID, tuple[str, str | None, uuid.UUID | None]],
        run_ids: list[dict[str, Any]],
        unstartable: list[uuid.UUID],
    ) -> None:
        """Run ids, ledger outcomes (each set once) and the job's counts of the outcomes
        set now, in one transaction."""
        connection = await session.connection()
        if run_ids:
            started = sa.values(
                sa.column("enrollment_id", sa.Uuid), sa.column("run_id", sa.String), name="started"
            ).data([(row["enrollment_id"], row["run_id"]) for row in run_ids])
            await connection.execute(
                sa.update(Enrollment)
                .where(col(Enrollment.id) == started.c.enrollment_id)
                .where(col(Enrollment.run_id).is_(None))
                .values(run_id=started.c.run_id)
            )
        if unstartable:
            await connection.execute(
                sa.update(Enrollment)
                .where(col(Enrollment.id).in_(unstartable))
                .where(col(Enrollment.run_id).is_(None))
                .values(
                    status=EnrollmentStatus.failed,
                    exit_reason="the run could not be started",
                    ended_at=utcnow(),
                )
            )
        if outcomes:
            done = sa.values(
                sa.column("contact_id", sa.Uuid),
                sa.column("outcome", sa.String),
                sa.column("reason", sa.String),
                sa.column("enrollment_id", sa.Uuid),
                name="done",
            ).data([(contact, *outcome) for contact, outcome in outcomes.items()])
            changed = await connection.execute(
                sa.update(BulkEnrollmentItem)
                .where(col(BulkEnrollmentItem.job_id) == job_id)
                .where(col(BulkEnrollmentItem.contact_id) == done.c.contact_id)
                .where(col(BulkEnrollmentItem.outcome).is_(None))
                .values(
                    outcome=done.c.outcome,
                    reason=done.c.reason,
                    enrollment_id=done.c.enrollment_id,
                    done_at=utcnow(),
                )
                .returning(col(BulkEnrollmentItem.outcome))
            )
            counts = Counter(changed.scalars())
            if counts:
                assert set(counts) <= set(_COUNTS)
                await connection.execute(
                    sa.update(BulkEnrollmentJob)
                    .where(col(BulkEnrollmentJob.id) == job_id)
                    .values(
                        {
                            outcome: getattr(BulkEnrollmentJob, outcome) + n
                            for outcome, n in counts.items()
                        }
                    )
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
