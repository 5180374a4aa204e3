"""Work the routes share: finding contacts and journeys, delivering events and changes."""

from __future__ import annotations

from fastapi import HTTPException, status
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from activities.delivery import (
    deliver_event,
    deliver_events,
    dispatch_contact_changes,
    dispatch_event,
    notify_contact_changed,
    notify_journey_status,
    start_triggered,
)
from api.schemas import ContactRef
from models.tables import Contact, Journey

__all__ = [
    "deliver_event",
    "deliver_events",
    "dispatch_contact_changes",
    "dispatch_event",
    "find_contact",
    "get_journey",
    "notify_contact_changed",
    "notify_journey_status",
    "start_triggered",
]


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
