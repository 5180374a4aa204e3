"""Starting bulk enrollment jobs: from the API (a list or a segment) and on publish
(``enroll_on_publish``). The job row and a list's ledger are committed before the
workflow starts, so the workflow only ever finds a job that exists."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from models.campaigns import BulkEnrollInput, bulk_workflow_id
from models.tables import BulkEnrollmentItem, BulkEnrollmentJob, BulkJobStatus, Journey, utcnow
from settings import Settings
from workflows.bulk_enroll import BulkEnrollWorkflow

_CHUNK = 5_000


async def start_bulk_job(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    journey: Journey,
    *,
    segment_key: str | None = None,
    contact_ids: Sequence[uuid.UUID] = (),
) -> BulkEnrollmentJob:
    """Store the job (and a list's ledger, which fixes its audience), commit, start it."""
    job_id = uuid.uuid4()
    unique_ids = list(dict.fromkeys(contact_ids))
    job = BulkEnrollmentJob(
        id=job_id,
        journey_id=journey.id,
        source="segment" if segment_key else "list",
        segment_key=segment_key,
        workflow_id=bulk_workflow_id(str(job_id)),
        status=BulkJobStatus.running,
    )
    if segment_key is None:
        # A list's audience is fixed here; a segment's when the workflow starts.
        job.total, job.audience_fixed_at = len(unique_ids), utcnow()
    session.add(job)
    await session.flush()
    connection = await session.connection()
    for start in range(0, len(unique_ids), _CHUNK):
        await connection.execute(
            insert(BulkEnrollmentItem).on_conflict_do_nothing(),
            [{"job_id": job_id, "contact_id": c} for c in unique_ids[start : start + _CHUNK]],
        )
    await session.commit()
    try:
        await temporal.start_workflow(
            BulkEnrollWorkflow.run,
            BulkEnrollInput(
                journey_key=journey.key,
                job_id=str(job_id),
                segment_key=segment_key,
                page_size=settings.bulk_enroll_page_size,
                concurrency=settings.bulk_enroll_concurrency,
            ),
            id=job.workflow_id,
            task_queue=settings.task_queue,
            static_summary=f"Bulk enrollment into {journey.name} "
            + (f"of segment {segment_key}" if segment_key else f"of {len(unique_ids)} contacts"),
        )
    except BaseException:
        # Nothing ran: leave no job behind that would look stuck.
        await (await session.connection()).execute(
            sa.delete(BulkEnrollmentJob).where(BulkEnrollmentJob.id == job_id)  # type: ignore[arg-type]
        )
        await session.commit()
        raise
    return job
