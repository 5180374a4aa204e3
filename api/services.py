"""Work the routes share: finding contacts, enrolling them, delivering events."""

from __future__ import annotations

import contextlib
import logging
import uuid
from typing import Any

from fastapi import HTTPException, status
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.service import RPCError, RPCStatusCode

from api.schemas import ContactRef
from models.contracts import (
    SA_CONTACT,
    SA_JOURNEY,
    SA_STATUS,
    EventSignal,
    JourneyInput,
    journey_workflow_id,
)
from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Event,
    Journey,
    JourneyStatus,
    JourneyVersion,
    utcnow,
)
from settings import Settings
from workflows.journey import JourneyWorkflow

log = logging.getLogger(__name__)


async def find_contact(session: AsyncSession, ref: ContactRef) -> Contact:
    """The contact a request names, or a 404 that says which one is missing."""
    if ref.contact_id is not None:
        contact = await session.get(Contact, ref.contact_id)
        named = f"id {ref.contact_id}"
    elif ref.email is not None:
        contact = (await session.exec(select(Contact).where(Contact.email == ref.email))).first()
        named = f"email {ref.email}"
    else:
        contact = (
            await session.exec(select(Contact).where(Contact.external_id == ref.external_id))
        ).first()
        named = f"external_id {ref.external_id}"
    if contact is None or contact.erased_at is not None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no contact with {named}")
    return contact


async def get_journey(session: AsyncSession, key: str) -> Journey:
    journey = (await session.exec(select(Journey).where(Journey.key == key))).first()
    if journey is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no journey with key {key!r}")
    return journey


async def enroll(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    journey: Journey,
    contact: Contact,
    trigger: dict[str, Any] | None = None,
) -> tuple[Enrollment, bool]:
    """Enroll a contact in a journey's current version; idempotent.

    The enrollment row is committed first (its partial unique index allows one active
    run per journey and contact), then the workflow is started with a deterministic id
    and USE_EXISTING, so a retry after a crash between the two finishes the job.
    """
    if journey.status != JourneyStatus.active or journey.current_version is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"journey {journey.key!r} is {journey.status}: publish it before enrolling",
        )
    existing = await _latest_enrollment(session, journey.id, contact.id)
    created = False
    if existing is None:
        version = (
            await session.exec(
                select(JourneyVersion)
                .where(JourneyVersion.journey_id == journey.id)
                .where(JourneyVersion.version == journey.current_version)
            )
        ).one()
        enrollment_id = uuid.uuid4()
        inserted = await session.exec(
            insert(Enrollment)
            .values(
                id=enrollment_id,
                journey_id=journey.id,
                journey_version_id=version.id,
                contact_id=contact.id,
                run_key="",
                workflow_id=journey_workflow_id(journey.key, str(contact.id)),
                status=EnrollmentStatus.active,
                started_at=utcnow(),
            )
            .on_conflict_do_nothing()
            .returning(col(Enrollment.id))
        )
        created = inserted.first() is not None
        await session.commit()
        existing = await _latest_enrollment(session, journey.id, contact.id)
        assert existing is not None
        if created:
            await _start_workflow(temporal, settings, journey, version, existing, trigger)
    elif existing.status == EnrollmentStatus.active:
        # Finish an earlier attempt that stored the row but may not have started the run.
        started_on = await session.get(JourneyVersion, existing.journey_version_id)
        assert started_on is not None
        await _start_workflow(temporal, settings, journey, started_on, existing, trigger)
    return existing, created


async def _latest_enrollment(
    session: AsyncSession, journey_id: uuid.UUID, contact_id: uuid.UUID
) -> Enrollment | None:
    # Re-entry is "never" until the journey language grows re-entry policies: any
    # earlier enrollment, active or ended, is the answer.
    return (
        await session.exec(
            select(Enrollment)
            .where(Enrollment.journey_id == journey_id)
            .where(Enrollment.contact_id == contact_id)
            .order_by(col(Enrollment.started_at).desc())
        )
    ).first()


async def _start_workflow(
    temporal: Client,
    settings: Settings,
    journey: Journey,
    version: JourneyVersion,
    enrollment: Enrollment,
    trigger: dict[str, Any] | None,
) -> None:
    # WorkflowAlreadyStartedError: that run already ended; the enrollment row says how.
    with contextlib.suppress(WorkflowAlreadyStartedError):
        await temporal.start_workflow(
            JourneyWorkflow.run,
            JourneyInput(
                enrollment_id=str(enrollment.id),
                journey_key=journey.key,
                journey_version=version.version,
                document=version.document,
                contact_id=str(enrollment.contact_id),
                trigger=trigger,
            ),
            id=enrollment.workflow_id,
            task_queue=settings.task_queue,
            id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
            id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            search_attributes=TypedSearchAttributes(
                [
                    SearchAttributePair(SA_JOURNEY, journey.key),
                    SearchAttributePair(SA_CONTACT, str(enrollment.contact_id)),
                    SearchAttributePair(SA_STATUS, "active"),
                ]
            ),
            static_summary=(
                f"{journey.name} (v{version.version}) for contact {enrollment.contact_id}"
            ),
            static_details=(
                f"Journey **{journey.key}** version {version.version}\n\n"
                f"Contact `{enrollment.contact_id}`, enrollment `{enrollment.id}`"
            ),
        )


async def deliver_event(session: AsyncSession, temporal: Client, event: Event) -> int:
    """Signal an event to each running journey of its contact; return how many got it.

    Journeys de-duplicate by event id, so delivering twice is harmless.
    """
    if event.contact_id is None:
        return 0
    workflow_ids = (
        await session.exec(
            select(Enrollment.workflow_id)
            .where(Enrollment.contact_id == event.contact_id)
            .where(Enrollment.status == EnrollmentStatus.active)
        )
    ).all()
    signal = EventSignal(
        event_id=str(event.id),
        name=event.name,
        properties=event.properties,
        occurred_at=event.occurred_at.isoformat(),
    )
    delivered = 0
    for workflow_id in workflow_ids:
        handle: WorkflowHandle[Any, Any] = temporal.get_workflow_handle(workflow_id)
        try:
            await handle.signal(JourneyWorkflow.event, signal)
            delivered += 1
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            log.info(
                "workflow %s already closed; event %s not delivered to it", workflow_id, event.id
            )
    event.delivered_at = utcnow()
    session.add(event)
    return delivered
