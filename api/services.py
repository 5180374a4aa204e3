"""Work the routes share: finding contacts and journeys, delivering events and changes."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import HTTPException, status
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.contacts import snapshot
from activities.enrollments import EnrollmentRefused, enroll
from api.schemas import ContactRef
from models.conditions import evaluate
from models.contracts import ContactChangedSignal, EventSignal, JourneyStatusSignal
from models.journey import parse_journey
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


async def _signal_active(
    session: AsyncSession, temporal: Client, signal_name: str, arg: Any, **where: Any
) -> int:
    """Send a signal to every active enrollment matching ``where``; return how many got it."""
    query = select(Enrollment.workflow_id).where(Enrollment.status == EnrollmentStatus.active)
    for name, value in where.items():
        query = query.where(getattr(Enrollment, name) == value)
    delivered = 0
    for workflow_id in (await session.exec(query)).all():
        try:
            await temporal.get_workflow_handle(workflow_id).signal(signal_name, arg)
            delivered += 1
        except RPCError as err:
            if err.status != RPCStatusCode.NOT_FOUND:
                raise
            log.info("workflow %s already closed; %s not delivered", workflow_id, signal_name)
    return delivered


def event_signal(event: Event) -> EventSignal:
    return EventSignal(
        event_id=str(event.id),
        name=event.name,
        properties=event.properties,
        occurred_at=event.occurred_at.isoformat(),
    )


async def deliver_event(session: AsyncSession, temporal: Client, event: Event) -> int:
    """Signal an event to each running journey of its contact; return how many got it.

    Journeys de-duplicate by event id, so delivering twice is harmless.
    """
    if event.contact_id is None:
        return 0
    delivered = await _signal_active(
        session, temporal, "event", event_signal(event), contact_id=event.contact_id
    )
    event.delivered_at = utcnow()
    session.add(event)
    return delivered


async def start_triggered(
    session: AsyncSession, temporal: Client, settings: Settings, event: Event
) -> list[str]:
    """Enroll the event's contact in every journey this event triggers; return their keys.

    Racing events are safe: the enrollment row's unique index and the deterministic
    workflow id leave exactly one run per (journey, contact, key value).
    """
    if event.contact_id is None:
        return []
    contact = await session.get(Contact, event.contact_id)
    journeys = (
        await session.exec(
            select(Journey)
            .where(Journey.trigger_event == event.name)
            .where(col(Journey.status).in_([JourneyStatus.active, JourneyStatus.paused]))
        )
    ).all()
    started = []
    for journey in journeys:
        version = (
            await session.exec(
                select(JourneyVersion)
                .where(JourneyVersion.journey_id == journey.id)
                .where(JourneyVersion.version == journey.current_version)
            )
        ).one()
        trigger = parse_journey(version.document).trigger
        if trigger is None or contact is None:
            continue
        if trigger.where is not None and not evaluate(
            trigger.where, {}, {"properties": event.properties}
        ):
            continue
        run_key = ""
        if trigger.key:
            value = event.properties.get(trigger.key)
            if value is None or value == "":
                log.info("event %s lacks key %s for journey %s", event.id, trigger.key, journey.key)
                continue
            run_key = str(value)
        signal = event_signal(event)
        try:
            _, created = await enroll(
                session,
                temporal,
                settings,
                journey,
                contact,
                trigger={"event": event.name, "id": signal.event_id, **signal.__dict__},
                run_key=run_key,
                trigger_signal=signal,
            )
        except EnrollmentRefused:
            continue
        if created:
            started.append(journey.key)
    return started


async def notify_contact_changed(session: AsyncSession, temporal: Client, contact: Contact) -> int:
    return await _signal_active(
        session,
        temporal,
        "contact_changed",
        ContactChangedSignal(snapshot(contact)),
        contact_id=contact.id,
    )


async def notify_journey_status(
    session: AsyncSession, temporal: Client, journey: Journey, new_status: JourneyStatus
) -> int:
    return await _signal_active(
        session,
        temporal,
        "journey_status",
        JourneyStatusSignal(new_status),
        journey_id=journey.id,
    )
