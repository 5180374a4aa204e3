"""Erasing a contact (GDPR right to erasure): personal data removed from every table, the
outbox and Temporal, while counts that hold no person (events by name and time, message
statuses) survive.

Erasing an erased contact again redoes every step and answers with what that call changed
(zeros, once all is gone): a retry after a failure half-way finishes the job.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from dataclasses import dataclass
from urllib.parse import urlsplit

from sqlalchemy import text
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.workflowservice.v1 import DeleteWorkflowExecutionRequest
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from api.schemas import ErasureResult
from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Message,
    WebhookCall,
    hashed_address,
    utcnow,
)
from settings import Settings

log = logging.getLogger(__name__)

ERASED = "contact erased"
# Statuses that mean the run (or its history) is already gone, or the server cannot delete.
_GONE = {RPCStatusCode.NOT_FOUND, RPCStatusCode.UNIMPLEMENTED}


@dataclass
class _Run:
    workflow_id: str
    run_id: str | None
    active: bool


async def erase_contact(
    session: AsyncSession, temporal: Client, settings: Settings, contact: Contact
) -> ErasureResult:
    """Erase ``contact`` and the anonymous profiles merged into it. Commits."""
    rows = await session.exec(select(Contact.id).where(Contact.merged_into == contact.id))
    ids = [contact.id, *rows.all()]
    enrollments = (
        await session.exec(select(Enrollment).where(col(Enrollment.contact_id).in_(ids)))
    ).all()
    runs = [_Run(e.workflow_id, e.run_id, e.status == EnrollmentStatus.active) for e in enrollments]
    # Journeys stop first, so none sends to the contact while the data goes.
    for run in runs:
        if run.active:
            await _terminate(temporal, run.workflow_id)

    now = utcnow()
    journeys_ended = 0
    for enrollment in enrollments:
        if enrollment.status == EnrollmentStatus.active:
            enrollment.status = EnrollmentStatus.exited
            enrollment.exit_reason = ERASED
            enrollment.ended_at = now
            journeys_ended += 1
        if enrollment.run_key and not enrollment.run_key.startswith("sha256:"):
            # The key value (an event property, maybe an email) is also in the workflow id.
            hashed = hashed_address(enrollment.run_key)
            enrollment.workflow_id = enrollment.workflow_id.replace(enrollment.run_key, hashed)
            enrollment.run_key = hashed
        session.add(enrollment)

    message_rows = (
        await session.exec(
            select(Message.id, Message.channel, Message.to_address).where(
                (col(Message.contact_id).in_(ids))
                | (col(Message.enrollment_id).in_([e.id for e in enrollments]))
            )
        )
    ).all()
    addresses = {a for _, _, a in message_rows if a}
    for person in await _contacts(session, ids):
        addresses |= {a for a in (person.email, person.phone) if a}
    await _hash_suppressions(session, sorted(addresses))

    events = await _execute(
        session,
        "UPDATE events SET properties = '{}'::jsonb "
        "WHERE contact_id = ANY(:ids) AND properties <> '{}'::jsonb",
        ids=ids,
    )
    messages = await _execute(
        session,
        "UPDATE messages SET to_address = NULL, subject = NULL, error = NULL "
        "WHERE id = ANY(:mids) AND (to_address IS NOT NULL OR subject IS NOT NULL "
        "OR error IS NOT NULL)",
        mids=[m for m, _, _ in message_rows],
    )
    await _execute(
        session,
        "UPDATE crm_tasks SET note = NULL, properties = '{}'::jsonb, sync_error = NULL "
        "WHERE contact_id = ANY(:ids)",
        ids=ids,
    )
    calls = (
        await session.exec(select(WebhookCall).where(col(WebhookCall.contact_id).in_(ids)))
    ).all()
    for call in calls:
        parts = urlsplit(call.url)
        origin = f"{parts.scheme}://{parts.hostname or ''}" + (
            f":{parts.port}" if parts.port else ""
        )
        if call.url != origin:
            call.url = origin
            session.add(call)
    await _execute(session, "DELETE FROM segment_members WHERE contact_id = ANY(:ids)", ids=ids)
    await _execute(session, "DELETE FROM applied_updates WHERE contact_id = ANY(:ids)", ids=ids)
    await _execute(
        session,
        "UPDATE contacts SET email = NULL, phone = NULL, external_id = NULL, "
        "anonymous_id = NULL, crm_id = NULL, attributes = '{}'::jsonb, tags = '{}', "
        "timezone = NULL, erased_at = coalesce(erased_at, now()), updated_at = now() "
        "WHERE id = ANY(:ids)",
        ids=ids,
    )
    await session.commit()

    removed = _remove_outbox_files(settings, [m for m, _, _ in message_rows])
    for run in runs:
        await _delete_history(temporal, run)
    return ErasureResult(
        erased=True,
        journeys_ended=journeys_ended,
        events_anonymised=events,
        messages_scrubbed=messages,
        outbox_files_removed=removed,
    )


async def _contacts(session: AsyncSession, ids: list[uuid.UUID]) -> list[Contact]:
    return list((await session.exec(select(Contact).where(col(Contact.id).in_(ids)))).all())


async def _execute(session: AsyncSession, sql: str, **params: object) -> int:
    result = await session.exec(text(sql).bindparams(**params))  # type: ignore[call-overload]
    return int(result.rowcount or 0)


async def _hash_suppressions(session: AsyncSession, addresses: list[str]) -> None:
    """Keep the suppressions of the contact's addresses, but only as hashes."""
    if not addresses:
        return
    hashed = [hashed_address(a) for a in addresses]
    # A hashed copy may exist already (erased before, re-imported, suppressed again).
    await _execute(
        session,
        "DELETE FROM suppressions s USING unnest(CAST(:plain AS text[]), "
        "CAST(:hashed AS text[])) AS a(plain, hashed) "
        "WHERE lower(s.address) = a.plain AND EXISTS (SELECT 1 FROM suppressions h "
        "WHERE h.channel = s.channel AND h.address = a.hashed)",
        plain=[a.lower() for a in addresses],
        hashed=hashed,
    )
    await _execute(
        session,
        "UPDATE suppressions s SET address = a.hashed "
        "FROM unnest(CAST(:plain AS text[]), CAST(:hashed AS text[])) AS a(plain, hashed) "
        "WHERE lower(s.address) = a.plain",
        plain=[a.lower() for a in addresses],
        hashed=hashed,
    )


def _remove_outbox_files(settings: Settings, message_ids: list[uuid.UUID]) -> int:
    removed = 0
    for message_id in message_ids:
        for name in (
            f"email/{message_id}.eml",
            f"email/{message_id}.eml.partial",
            f"sms/{message_id}.json",
            f"sms/{message_id}.json.partial",
        ):
            path = settings.outbox_path / name
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed += 1
    return removed


async def _terminate(temporal: Client, workflow_id: str) -> None:
    try:
        await temporal.get_workflow_handle(workflow_id).terminate(reason=ERASED)
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        log.info("workflow %s already closed", workflow_id)


async def _delete_history(temporal: Client, run: _Run) -> None:
    """Delete the run's history (it holds the contact's data); the current run if none."""
    for run_id in {run.run_id or "", ""}:
        request = DeleteWorkflowExecutionRequest(
            namespace=temporal.namespace,
            workflow_execution=WorkflowExecution(workflow_id=run.workflow_id, run_id=run_id),
        )
        try:
            await temporal.workflow_service.delete_workflow_execution(request)
        except RPCError as err:
            if err.status not in _GONE:
                raise
            log.info("history of %s not deleted: %s", run.workflow_id, err.message)
