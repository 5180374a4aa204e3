"""Activities that read contacts."""

from __future__ import annotations

import uuid

from temporalio import activity

from models.contracts import ContactSnapshot, LoadContactInput
from models.db import session_scope
from models.tables import Contact


def snapshot(contact: Contact) -> ContactSnapshot:
    return ContactSnapshot(
        id=str(contact.id),
        email=contact.email,
        phone=contact.phone,
        external_id=contact.external_id,
        timezone=contact.timezone,
        lifecycle_stage=contact.lifecycle_stage,
        score=contact.score,
        tags=list(contact.tags),
        attributes=dict(contact.attributes),
    )


class ContactActivities:
    def __init__(self, database_url: str | None = None) -> None:
        self.database_url = database_url

    @activity.defn(name="load_contact")
    async def load_contact(self, input: LoadContactInput) -> ContactSnapshot:
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, uuid.UUID(input.contact_id))
            if contact is None or contact.erased_at is not None:
                return ContactSnapshot(id=input.contact_id, found=False)
            return snapshot(contact)
