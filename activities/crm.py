"""The ``crm`` step: a sales task or a CRM update, kept in Nurture's own tables.

Each row is written once per business key. When a CRM adapter is configured (HubSpot, a
signed webhook), recording a row starts its ``CrmSyncWorkflow`` (id ``crm-sync-<task
id>``), which runs ``sync_crm_task`` with retries until the CRM has it; the row keeps
the CRM's id, when it was synced, how many attempts it took and the last error.
"""

from __future__ import annotations

import contextlib
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select, update
from temporalio import activity
from temporalio.client import Client
from temporalio.common import WorkflowIDReusePolicy
from temporalio.exceptions import ApplicationError, WorkflowAlreadyStartedError

from activities.contacts import apply_update
from activities.crm_adapters import (
    CrmAdapter,
    CrmContactData,
    CrmTaskData,
    build_adapter,
)
from activities.delivery import dispatch_contact_changes
from models.contracts import CrmInput, UpdateContactInput
from models.db import session_scope
from models.tables import Contact, CrmTask, utcnow
from settings import Settings

CRM_SYNC_WORKFLOW = "CrmSyncWorkflow"


def crm_sync_workflow_id(task_id: str) -> str:
    return f"crm-sync-{task_id}"


@dataclass
class CrmSyncInput:
    """Input of ``CrmSyncWorkflow``: the crm_tasks row to sync."""

    task_id: str


@dataclass
class SyncCrmTaskInput:
    task_id: str


@dataclass
class SyncCrmTaskResult:
    status: str  # synced | already synced | skipped
    external_id: str | None = None
    crm_contact_id: str | None = None
    reason: str | None = None


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


class _RecordProgress:
    """Writes what the CRM made the moment it made it, so a retry does not make it again."""

    def __init__(self, database_url: str | None, task_id: uuid.UUID, contact_id: uuid.UUID):
        self.database_url = database_url
        self.task_id = task_id
        self.contact_id = contact_id

    async def contact_synced(self, crm_id: str) -> None:
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(Contact).where(col(Contact.id) == self.contact_id).values(crm_id=crm_id)
            )

    async def task_created(self, external_id: str) -> None:
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(CrmTask)
                .where(col(CrmTask.id) == self.task_id)
                .values(external_id=external_id)
            )


class CrmActivities:
    def __init__(
        self,
        settings: Settings,
        client: Client | None = None,
        adapter: CrmAdapter | None = None,
    ) -> None:
        self.settings = settings
        self.database_url = settings.database_url
        # Starts the sync workflow of each new task; without it tasks stay local only.
        self.client = client
        self.adapter = adapter or build_adapter(settings)

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
            created = inserted.scalar_one_or_none()
            if created is not None:
                recorded = str(created)
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
                    await session.commit()
                    # Scores, stages and segments follow the update; journeys hear of it.
                    await dispatch_contact_changes(
                        session, activity.client(), self.settings, [contact.id],
                        profile_changed=True,
                    )  # fmt: skip
            else:
                recorded = str(
                    (
                        await session.exec(
                            select(CrmTask.id).where(
                                CrmTask.idempotency_key == input.idempotency_key
                            )
                        )
                    ).one()
                )
        # After the commit, so the sync workflow finds the row; on a retry too, in case
        # the first attempt died between the two (the fixed workflow id keeps it to one).
        await self._start_sync(recorded)
        return recorded if created is not None else "already recorded"

    async def _start_sync(self, task_id: str) -> None:
        if self.settings.crm_adapter == "none":
            return
        if self.client is None:
            activity.logger.warning(
                "crm_adapter is %s but this worker has no Temporal client; task %s not synced",
                self.settings.crm_adapter,
                task_id,
            )
            return
        # Already started: a retried record_crm_action, or the first attempt got this far.
        with contextlib.suppress(WorkflowAlreadyStartedError):
            await self.client.start_workflow(
                CRM_SYNC_WORKFLOW,
                CrmSyncInput(task_id),
                id=crm_sync_workflow_id(task_id),
                task_queue=activity.info().task_queue,
                # A finished sync is not redone when record_crm_action is retried.
                id_reuse_policy=WorkflowIDReusePolicy.REJECT_DUPLICATE,
            )

    @activity.defn(name="sync_crm_task")
    async def sync_crm_task(self, input: SyncCrmTaskInput) -> SyncCrmTaskResult:
        """Push one crm_tasks row to the configured CRM; a synced row returns at once."""
        task_id = uuid.UUID(input.task_id)
        async with session_scope(self.database_url) as session:
            task = await session.get(CrmTask, task_id, with_for_update=True)
            if task is None:
                return SyncCrmTaskResult("skipped", reason="task no longer exists")
            if task.synced_at is not None:
                return SyncCrmTaskResult("already synced", task.external_id)
            if self.adapter is None:
                return SyncCrmTaskResult("skipped", reason="no CRM adapter configured")
            task.sync_attempts += 1
            contact = await session.get(Contact, task.contact_id) if task.contact_id else None
            if contact is None or contact.erased_at is not None:
                # Nothing personal is sent for an erased contact; the row says why.
                task.sync_error = "contact erased or deleted before the sync; nothing sent"
                session.add(task)
                return SyncCrmTaskResult("skipped", reason=task.sync_error)
            session.add(task)
            task_data = CrmTaskData(
                id=str(task.id),
                idempotency_key=task.idempotency_key,
                action=task.action,
                note=task.note,
                owner=task.owner,
                due_at=_iso(task.due_at),
                created_at=_iso(task.created_at),
                properties=dict(task.properties or {}),
                journey_key=task.journey_key,
                step_id=task.step_id,
                external_id=task.external_id,
            )
            contact_data = CrmContactData(
                id=str(contact.id),
                email=contact.email,
                phone=contact.phone,
                external_id=contact.external_id,
                lifecycle_stage=contact.lifecycle_stage,
                score=contact.score,
                attributes=dict(contact.attributes or {}),
                crm_id=contact.crm_id,
            )
        progress = _RecordProgress(self.database_url, task_id, contact.id)
        try:
            result = await self.adapter.sync(task_data, contact_data, progress)
        except Exception as err:
            await self._record_error(task_id, f"{self.adapter.name}: {err}")
            raise
        async with session_scope(self.database_url) as session:
            stored = await session.get(CrmTask, task_id, with_for_update=True)
            if stored is None:
                raise ApplicationError(f"crm task {task_id} vanished", non_retryable=True)
            stored.external_id = result.external_task_id or stored.external_id
            stored.synced_at = utcnow()
            stored.sync_error = None
            session.add(stored)
        return SyncCrmTaskResult("synced", result.external_task_id, result.crm_contact_id)

    async def _record_error(self, task_id: uuid.UUID, message: str) -> None:
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(CrmTask).where(col(CrmTask.id) == task_id).values(sync_error=message[:2000])
            )
