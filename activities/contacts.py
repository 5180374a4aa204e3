"""Activities that read and change contacts."""

from __future__ import annotations

import uuid

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col
from temporalio import activity

from activities.delivery import dispatch_contact_changes
from activities.snapshots import contact_snapshot, snapshot
from models.contracts import ContactSnapshot, LoadContactInput, UpdateContactInput
from models.db import session_scope
from models.tables import AppliedUpdate, Contact, utcnow
from settings import Settings


class ContactActivities:
    def __init__(self, database_url: str | None = None) -> None:
        self.database_url = database_url

    @activity.defn(name="load_contact")
    async def load_contact(self, input: LoadContactInput) -> ContactSnapshot:
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, uuid.UUID(input.contact_id))
            if contact is None or contact.erased_at is not None:
                return ContactSnapshot(id=input.contact_id, found=False)
            return await contact_snapshot(session, contact)


async def apply_update(contact: Contact, input: UpdateContactInput) -> None:
    """Apply an update_contact step (or API change) to a loaded contact."""
    if input.set:
        merged = dict(contact.attributes)
        for name, value in input.set.items():
            if value is None:
                merged.pop(name, None)
            elif name in ("timezone", "lifecycle_stage"):
                setattr(contact, name, value)
            else:
                merged[name] = value
        contact.attributes = merged
    if input.add_tags or input.remove_tags:
        tags = [t for t in contact.tags if t not in input.remove_tags]
        contact.tags = tags + [t for t in input.add_tags if t not in tags]
    if input.score:
        contact.score += input.score
        contact.score_adjustment += input.score
    if input.lifecycle_stage:
        contact.lifecycle_stage = input.lifecycle_stage
    contact.updated_at = utcnow()


class ContactUpdateActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url

    @activity.defn(name="update_contact")
    async def update_contact(self, input: UpdateContactInput) -> ContactSnapshot:
        """Set attributes, tags, a score delta and the stage, once per business key.

        The key is recorded in the same transaction as the change, so a retry after a
        commit whose completion was lost does not add the score twice.
        """
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, uuid.UUID(input.contact_id), with_for_update=True)
            if contact is None or contact.erased_at is not None:
                return ContactSnapshot(id=input.contact_id, found=False)
            first_time = await session.exec(
                insert(AppliedUpdate)
                .values(idempotency_key=input.idempotency_key, contact_id=contact.id)
                .on_conflict_do_nothing()
                .returning(col(AppliedUpdate.idempotency_key))
            )
            changed = first_time.first() is not None
            if changed:
                await apply_update(contact, input)
                session.add(contact)
                await session.commit()
                # Scores, stages and segments follow; other journeys hear of it (this one
                # gets the refreshed contact as the result).
                await dispatch_contact_changes(
                    session,
                    activity.client(),
                    self.settings,
                    [contact.id],
                    profile_changed=True,
                    changed_by=activity.info().workflow_id,
                )
                await session.refresh(contact)
            return await contact_snapshot(session, contact)


__all__ = ["ContactActivities", "ContactUpdateActivities", "apply_update", "snapshot"]
