"""Bulk enrollment: a list or a segment into a journey in one call, once
(``/v1/journeys/{key}/bulk-enrollments``, read and cancelled under
``/v1/bulk-enrollments``) or on a recurring Temporal Schedule
(``/v1/journeys/{key}/enrollment-schedules``, ``/v1/enrollment-schedules``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlmodel import col, select
from temporalio.client import (
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
    WorkflowQueryFailedError,
)
from temporalio.service import RPCError, RPCStatusCode

from api.bulk import start_bulk_job
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.schemas import normalise_email
from api.services import get_journey
from models.campaigns import BulkEnrollInput, BulkProgress, enrollment_schedule_id
from models.journey import KEY_PATTERN, check_timezone
from models.tables import (
    BulkEnrollmentJob,
    BulkJobStatus,
    Contact,
    EnrollmentSchedule,
    Journey,
    JourneyStatus,
    Segment,
    utcnow,
)
from settings import Settings
from workflows.bulk_enroll import BulkEnrollWorkflow

router = APIRouter(tags=["bulk enrollment"])

JourneyKey = Annotated[str, Path(pattern=KEY_PATTERN, description="Journey key, [a-z0-9-].")]
MAX_LIST = 100_000


class BulkEnrollIn(BaseModel):
    """Exactly one of ``contact_ids``, ``emails`` or ``segment``."""

    model_config = ConfigDict(extra="forbid")
    contact_ids: list[uuid.UUID] | None = Field(default=None, min_length=1, max_length=MAX_LIST)
    emails: list[str] | None = Field(default=None, min_length=1, max_length=MAX_LIST)
    segment: str | None = Field(default=None, pattern=KEY_PATTERN)

    @field_validator("emails")
    @classmethod
    def _emails(cls, value: list[str] | None) -> list[str] | None:
        return [normalise_email(v) for v in value] if value is not None else None

    @model_validator(mode="after")
    def _one_source(self) -> BulkEnrollIn:
        given = [n for n in ("contact_ids", "emails", "segment") if getattr(self, n) is not None]
        if len(given) != 1:
            raise ValueError("name the audience by exactly one of contact_ids, emails, segment")
        return self


class BulkJobPublic(BaseModel):
    id: uuid.UUID
    journey: str
    source: str
    segment: str | None
    schedule_id: uuid.UUID | None
    workflow_id: str
    status: str
    total: int | None
    enrolled: int
    already_enrolled: int
    skipped: int
    failed: int
    done: int
    error: str | None
    created_at: datetime
    finished_at: datetime | None
    # The workflow's own view (``progress`` query) while it runs; None once it has ended
    # or when Temporal cannot be asked (the stored counts above are kept current anyway).
    live: BulkProgress | None = None


def _cron_fields(value: str) -> str:
    fields = value.split()
    if len(fields) not in (5, 6, 7) and not value.startswith("@"):
        raise ValueError(
            f"cron {value!r}: use 5 fields 'minute hour day-of-month month day-of-week', "
            "e.g. '0 9 * * MON' for every Monday at 09:00"
        )
    return " ".join(fields) if fields else value


class ScheduleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segment: str = Field(pattern=KEY_PATTERN)
    cron: str = Field(min_length=1, max_length=200)
    timezone: str = "UTC"

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str) -> str:
        return _cron_fields(value)

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        check_timezone(value)
        return value


class ScheduleUpdateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    segment: str | None = Field(default=None, pattern=KEY_PATTERN)
    cron: str | None = Field(default=None, min_length=1, max_length=200)
    timezone: str | None = None

    @field_validator("cron")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        return _cron_fields(value) if value is not None else None

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_timezone(value)


class SchedulePublic(BaseModel):
    id: uuid.UUID
    journey: str
    segment: str
    cron: str
    timezone: str
    schedule_id: str  # the Temporal Schedule's id
    next_runs: list[datetime] = []
    created_at: datetime
    updated_at: datetime


async def _require_segment(session: SessionDep, key: str) -> Segment:
    segment = (await session.exec(select(Segment).where(Segment.key == key))).first()
    if segment is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"segment: no segment {key!r}")
    return segment


def _require_open(journey: Journey) -> None:
    if journey.status not in (JourneyStatus.active, JourneyStatus.paused):
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"journey {journey.key!r} is {journey.status}: "
            + ("publish it first" if journey.status == JourneyStatus.draft else "no new contacts"),
        )


async def job_public(
    session: SessionDep, job: BulkEnrollmentJob, temporal: TemporalDep | None = None
) -> BulkJobPublic:
    journey = await session.get(Journey, job.journey_id)
    assert journey is not None
    live = None
    if temporal is not None and job.status == BulkJobStatus.running:
        try:
            live = await temporal.get_workflow_handle(job.workflow_id).query(
                BulkEnrollWorkflow.progress_view
            )
        except (RPCError, WorkflowQueryFailedError):
            live = None
    return BulkJobPublic(
        id=job.id,
        journey=journey.key,
        source=job.source,
        segment=job.segment_key,
        schedule_id=job.schedule_id,
        workflow_id=job.workflow_id,
        status=job.status,
        total=job.total,
        enrolled=job.enrolled,
        already_enrolled=job.already_enrolled,
        skipped=job.skipped,
        failed=job.failed,
        done=job.enrolled + job.already_enrolled + job.skipped + job.failed,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
        live=live,
    )


@router.post(
    "/journeys/{key}/bulk-enrollments",
    response_model=BulkJobPublic,
    status_code=status.HTTP_202_ACCEPTED,
)
async def create_bulk_enrollment(
    key: JourneyKey,
    body: BulkEnrollIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> BulkJobPublic:
    """Enroll a list of contacts (ids or emails) or a segment's current members; answers at
    once with the job, whose progress ``GET /v1/bulk-enrollments/{id}`` shows."""
    journey = await get_journey(session, key)
    _require_open(journey)
    ids: list[uuid.UUID] = []
    if body.segment is not None:
        await _require_segment(session, body.segment)
    else:
        field, wanted = (
            ("contact_ids", list(body.contact_ids))
            if body.contact_ids is not None
            else ("emails", list(body.emails or []))
        )
        column = Contact.id if field == "contact_ids" else Contact.email
        found: dict[object, uuid.UUID] = {}
        for start in range(0, len(wanted), 10_000):
            chunk = wanted[start : start + 10_000]
            rows = await session.exec(
                select(column, Contact.id)
                .where(col(column).in_(chunk))
                .where(col(Contact.erased_at).is_(None))
            )
            found.update({value: contact_id for value, contact_id in rows.all()})
        missing = [str(v) for v in wanted if v not in found]
        if missing:
            raise HTTPException(
                status.HTTP_422_UNPROCESSABLE_CONTENT,
                f"{field}: {len(missing)} unknown contact(s), e.g. {', '.join(missing[:5])}; "
                "nothing was enrolled",
            )
        ids = [found[v] for v in wanted]
    job = await start_bulk_job(
        session, temporal, settings, journey, segment_key=body.segment, contact_ids=ids
    )
    return await job_public(session, job)


@router.get("/bulk-enrollments/{job_id}", response_model=BulkJobPublic)
async def get_bulk_enrollment(
    job_id: uuid.UUID, session: SessionDep, temporal: TemporalDep
) -> BulkJobPublic:
    """A job's progress: stored counts, and the workflow's own view while it runs."""
    job = await session.get(BulkEnrollmentJob, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bulk enrollment with id {job_id}")
    return await job_public(session, job, temporal)


@router.get("/bulk-enrollments", response_model=list[BulkJobPublic])
async def list_bulk_enrollments(
    session: SessionDep,
    journey: Annotated[str | None, Query(pattern=KEY_PATTERN)] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[BulkJobPublic]:
    """Jobs, newest first (optionally of one journey)."""
    query = select(BulkEnrollmentJob).order_by(col(BulkEnrollmentJob.created_at).desc())
    if journey is not None:
        query = query.where(
            BulkEnrollmentJob.journey_id == (await get_journey(session, journey)).id
        )
    rows = (await session.exec(query.limit(limit))).all()
    return [await job_public(session, job) for job in rows]


@router.post("/bulk-enrollments/{job_id}/cancel", response_model=BulkJobPublic)
async def cancel_bulk_enrollment(
    job_id: uuid.UUID, session: SessionDep, temporal: TemporalDep
) -> BulkJobPublic:
    """Stop the job after the contacts under way; those enrolled stay enrolled."""
    job = await session.get(BulkEnrollmentJob, job_id)
    if job is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no bulk enrollment with id {job_id}")
    if job.status != BulkJobStatus.running:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"bulk enrollment {job_id} is already {job.status}"
        )
    try:
        await temporal.get_workflow_handle(job.workflow_id).cancel()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    # The workflow records the end too; whichever comes first wins.
    job.status, job.finished_at = BulkJobStatus.cancelled, utcnow()
    session.add(job)
    await session.commit()
    await session.refresh(job)
    return await job_public(session, job)


def _schedule(settings: Settings, row: EnrollmentSchedule, journey_key: str) -> Schedule:
    return Schedule(
        action=ScheduleActionStartWorkflow(
            BulkEnrollWorkflow.run,
            BulkEnrollInput(
                journey_key=journey_key,
                segment_key=row.segment_key,
                schedule_id=str(row.id),
                page_size=settings.bulk_enroll_page_size,
                concurrency=settings.bulk_enroll_concurrency,
            ),
            id=enrollment_schedule_id(str(row.id)),
            task_queue=settings.task_queue,
        ),
        spec=ScheduleSpec(cron_expressions=[row.cron], time_zone_name=row.timezone),
        # A run still going when the next is due: the next waits its turn, never overlaps.
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.BUFFER_ONE),
    )


async def schedule_public(
    session: SessionDep, temporal: TemporalDep | None, row: EnrollmentSchedule
) -> SchedulePublic:
    journey = await session.get(Journey, row.journey_id)
    assert journey is not None
    next_runs: list[datetime] = []
    if temporal is not None:
        try:
            described = await temporal.get_schedule_handle(
                enrollment_schedule_id(str(row.id))
            ).describe()
            next_runs = list(described.info.next_action_times[:5])
        except RPCError:
            next_runs = []
    return SchedulePublic(
        id=row.id,
        journey=journey.key,
        segment=row.segment_key,
        cron=row.cron,
        timezone=row.timezone,
        schedule_id=enrollment_schedule_id(str(row.id)),
        next_runs=next_runs,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )


def _invalid_schedule(err: RPCError) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT, f"cron: Temporal refused the schedule: {err}"
    )


@router.post(
    "/journeys/{key}/enrollment-schedules",
    response_model=SchedulePublic,
    status_code=status.HTTP_201_CREATED,
)
async def create_enrollment_schedule(
    key: JourneyKey,
    body: ScheduleIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> SchedulePublic:
    """Enroll the segment's members into the journey on a cron schedule in a time zone
    (``0 9 * * MON`` in ``Europe/Paris``: every Monday at 09:00 Paris time)."""
    journey = await get_journey(session, key)
    _require_open(journey)
    await _require_segment(session, body.segment)
    row = EnrollmentSchedule(
        journey_id=journey.id, segment_key=body.segment, cron=body.cron, timezone=body.timezone
    )
    session.add(row)
    await session.flush()
    try:
        await temporal.create_schedule(
            enrollment_schedule_id(str(row.id)), _schedule(settings, row, journey.key)
        )
    except RPCError as err:
        await session.rollback()
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise _invalid_schedule(err) from None
        raise
    await session.commit()
    return await schedule_public(session, temporal, row)


async def _schedule_row(session: SessionDep, schedule_id: uuid.UUID) -> EnrollmentSchedule:
    row = await session.get(EnrollmentSchedule, schedule_id)
    if row is None:
        raise HTTPException(
            status.HTTP_404_NOT_FOUND, f"no enrollment schedule with id {schedule_id}"
        )
    return row


@router.get("/enrollment-schedules", response_model=list[SchedulePublic])
async def list_enrollment_schedules(session: SessionDep) -> list[SchedulePublic]:
    rows = (
        await session.exec(select(EnrollmentSchedule).order_by(col(EnrollmentSchedule.created_at)))
    ).all()
    return [await schedule_public(session, None, row) for row in rows]


@router.get("/enrollment-schedules/{schedule_id}", response_model=SchedulePublic)
async def get_enrollment_schedule(
    schedule_id: uuid.UUID, session: SessionDep, temporal: TemporalDep
) -> SchedulePublic:
    """A schedule with its next run times (from Temporal)."""
    return await schedule_public(session, temporal, await _schedule_row(session, schedule_id))


@router.patch("/enrollment-schedules/{schedule_id}", response_model=SchedulePublic)
async def update_enrollment_schedule(
    schedule_id: uuid.UUID,
    body: ScheduleUpdateIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> SchedulePublic:
    """Change the segment, cron or time zone; Temporal's schedule follows."""
    row = await _schedule_row(session, schedule_id)
    if body.segment is not None:
        await _require_segment(session, body.segment)
        row.segment_key = body.segment
    if body.cron is not None:
        row.cron = body.cron
    if body.timezone is not None:
        row.timezone = body.timezone
    row.updated_at = utcnow()
    journey = await session.get(Journey, row.journey_id)
    assert journey is not None
    wanted = _schedule(settings, row, journey.key)

    def update(_: ScheduleUpdateInput) -> ScheduleUpdate:
        return ScheduleUpdate(schedule=wanted)

    try:
        await temporal.get_schedule_handle(enrollment_schedule_id(str(row.id))).update(update)
    except RPCError as err:
        await session.rollback()
        if err.status == RPCStatusCode.INVALID_ARGUMENT:
            raise _invalid_schedule(err) from None
        raise
    session.add(row)
    await session.commit()
    return await schedule_public(session, temporal, row)


@router.delete("/enrollment-schedules/{schedule_id}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_enrollment_schedule(
    schedule_id: uuid.UUID, session: SessionDep, temporal: TemporalDep
) -> Response:
    """Stop the recurring enrollment; jobs it already ran keep their results."""
    row = await _schedule_row(session, schedule_id)
    try:
        await temporal.get_schedule_handle(enrollment_schedule_id(str(row.id))).delete()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    await session.delete(row)
    await session.commit()
    return Response(status_code=status.HTTP_204_NO_CONTENT)
