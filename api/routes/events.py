from __future__ import annotations

import uuid

from fastapi import APIRouter, Response, status
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select

from activities.counters import EVENTS_RECEIVED
from activities.delivery import dispatch_event, or_defer
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.schemas import EventAccepted, EventIn
from api.services import find_contact
from models.tables import Event, utcnow

router = APIRouter(prefix="/events", tags=["events"])


@router.post("", response_model=EventAccepted, status_code=status.HTTP_202_ACCEPTED)
async def track_event(
    body: EventIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> EventAccepted:
    """Store one event (once per idempotency id) and signal it to the contact's journeys.

    Acknowledged once stored: if Temporal is unreachable, the inbox drain delivers it later
    (``delivered_to`` is then 0)."""
    contact = await find_contact(session, body)
    idempotency_id = body.id or str(uuid.uuid4())
    now = utcnow()
    inserted = await session.exec(
        insert(Event)
        .values(
            id=uuid.uuid4(),
            idempotency_id=idempotency_id,
            contact_id=contact.id,
            name=body.name,
            properties=body.properties,
            occurred_at=body.occurred_at or now,
            received_at=now,
            source="api",
        )
        .on_conflict_do_nothing(index_elements=["idempotency_id"])
        .returning(col(Event.id))
    )
    duplicate = inserted.first() is None
    if not duplicate:
        EVENTS_RECEIVED.labels("api").inc()
    # Commit before signalling: an event is stored before anything acts on it.
    await session.commit()
    event = (await session.exec(select(Event).where(Event.idempotency_id == idempotency_id))).one()
    accepted = EventAccepted(
        event_id=event.id, idempotency_id=idempotency_id, duplicate=duplicate, delivered_to=0
    )
    if not duplicate or event.delivered_at is None:
        delivered = await or_defer(
            session,
            temporal,
            lambda: dispatch_event(session, temporal, settings, event),
            f"event {event.id}",
        )
        accepted.delivered_to = delivered or 0
    if duplicate:
        response.status_code = status.HTTP_200_OK
    return accepted
