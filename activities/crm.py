"""The ``crm`` step: a sales task or a CRM update, kept in Nurture's own tables.

Outward sync to a CRM adapter (HubSpot, a signed webhook) reads these rows; each row is
written once per business key.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col
from temporalio import activity

from activities.contacts import apply_update
from models.contracts import CrmInput, UpdateContactInput
from models.db import session_scope
from models.tables import Contact, CrmTask, utcnow
from settings import Settings


class CrmActivities:
    def __init__(self, settings: Settings) -> None:
        self.database_url = settings.database_url

    @activity.defn(name="record_crm_action")
    async def record_crm_action(self, input: CrmInput) -> str:
        """Create the task (or apply the update) once; return the task id."""
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, uuid.UUID(input.contact_id), with_for_update=True)
            task_id = uuid.uuid4()
            due = (
                utcnow() + timedelta(seconds=input.due_in_seconds) if input.due_in_seconds else None
            )
            inserted = await session.exec(
                insert(CrmTask)
                .values(
                    id=task_id,
                    idempotency_key=input.idempotency_key,
                    contact_id=contact.id if contact else None,
                    enrollment_id=uuid.UUID(input.enrollment_id),
                    journey_key=input.journey_key,
                    step_id=input.step_id,
                    action=input.action,
                    note=input.note,
                    owner=input.owner,
                    properties=input.properties,
                    due_at=due,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
                .returning(col(CrmTask.id))
            )
            created = inserted.first()
            if created is None:
                return "already recorded"
            if (
                input.action == "update_contact"
                and contact is not None
                and contact.erased_at is None
            ):
                await apply_update(
                    contact,
                    UpdateContactInput(
                        input.idempotency_key, input.contact_id, set=input.properties
                    ),
                )
                session.add(contact)
            return str(created)
