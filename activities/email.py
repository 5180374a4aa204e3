"""The send_email activity: suppression checked at send time, one message per business key.

Order of work: the message row (unique business key) is committed before the
provider is called; a retry finds it and never sends a second copy.
"""

from __future__ import annotations

import asyncio
import uuid

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity

from activities.contacts import snapshot
from activities.providers.outbox import OutboxEmailProvider, OutgoingEmail
from activities.rendering import TemplateError, render_context, render_email
from models.contracts import SendEmailInput, SendEmailResult
from models.db import session_scope
from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Journey,
    Message,
    MessageChannel,
    MessageStatus,
    SubscriptionStatus,
    Suppression,
    Template,
    utcnow,
)
from settings import Settings


class EmailActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url
        self.provider = email_provider(settings)

    @activity.defn(name="send_email")
    async def send_email(self, input: SendEmailInput) -> SendEmailResult:
        async with session_scope(self.database_url) as session:
            message = await _message_by_key(session, input.idempotency_key)
            if message is None:
                message = await self._record(session, input)
        if message.status != MessageStatus.pending:
            return SendEmailResult(str(message.id), message.status, message.skip_reason)

        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, message.contact_id)
            template = (
                await session.exec(select(Template).where(Template.key == input.template))
            ).first()
        assert contact is not None and contact.email is not None and template is not None
        context = render_context(
            snapshot(contact).__dict__,
            {"key": input.journey_key, "version": input.journey_version, "step": input.step_id},
            input.trigger,
        )
        try:
            rendered = render_email(
                input.subject or template.subject, template.html, template.text, context
            )
        except TemplateError as err:
            return await self._fail(message, str(err))
        email = OutgoingEmail(
            message_id=str(message.id),
            to=contact.email,
            sender=self.settings.email_from,
            subject=rendered.subject,
            html=rendered.html,
            text=rendered.text,
        )
        provider_id = await asyncio.to_thread(self.provider.send, email)
        async with session_scope(self.database_url) as session:
            stored = await session.get(Message, message.id)
            assert stored is not None
            if stored.status == MessageStatus.pending:
                stored.status = MessageStatus.sent
                stored.sent_at = utcnow()
            stored.provider_message_id = provider_id
            stored.subject = rendered.subject
            session.add(stored)
        return SendEmailResult(str(message.id), MessageStatus.sent)

    async def _record(self, session: AsyncSession, input: SendEmailInput) -> Message:
        """Write the message row: pending, or skipped with the reason it may not go out."""
        contact = await session.get(Contact, uuid.UUID(input.contact_id))
        enrollment = await session.get(Enrollment, uuid.UUID(input.enrollment_id))
        template = (
            await session.exec(select(Template).where(Template.key == input.template))
        ).first()
        journey = (
            await session.exec(select(Journey).where(Journey.key == input.journey_key))
        ).first()
        reason = await _skip_reason(session, contact, enrollment)
        status = MessageStatus.skipped if reason else MessageStatus.pending
        if reason is None and (template is None or template.channel != MessageChannel.email):
            status, reason = MessageStatus.failed, f"no email template {input.template!r}"
        values = {
            "id": uuid.uuid4(),
            "idempotency_key": input.idempotency_key,
            "contact_id": contact.id if contact else None,
            "enrollment_id": enrollment.id if enrollment else None,
            "journey_id": journey.id if journey else None,
            "step_id": input.step_id,
            "variant": input.variant,
            "channel": MessageChannel.email,
            "template_key": input.template,
            "to_address": contact.email if contact else None,
            "provider": self.provider.name,
            "status": status,
            "skip_reason": reason,
            "created_at": utcnow(),
            "failed_at": utcnow() if status == MessageStatus.failed else None,
        }
        await session.exec(
            insert(Message)
            .values(**values)
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
        )
        await session.commit()
        message = await _message_by_key(session, input.idempotency_key)
        assert message is not None
        return message

    async def _fail(self, message: Message, error: str) -> SendEmailResult:
        async with session_scope(self.database_url) as session:
            stored = await session.get(Message, message.id)
            assert stored is not None
            stored.status, stored.error, stored.failed_at = MessageStatus.failed, error, utcnow()
            session.add(stored)
        return SendEmailResult(str(message.id), MessageStatus.failed, error)


def email_provider(settings: Settings) -> OutboxEmailProvider:
    """The provider ``NURTURE_EMAIL_PROVIDER`` names."""
    match settings.email_provider:
        case "outbox":
            return OutboxEmailProvider(settings.outbox_path)
    raise ValueError(f"unknown email provider {settings.email_provider!r}")


async def _message_by_key(session: AsyncSession, key: str) -> Message | None:
    return (await session.exec(select(Message).where(Message.idempotency_key == key))).first()


async def _skip_reason(
    session: AsyncSession, contact: Contact | None, enrollment: Enrollment | None
) -> str | None:
    if contact is None or contact.erased_at is not None:
        return "contact erased"
    if enrollment is None or enrollment.status != EnrollmentStatus.active:
        return "enrollment no longer active"
    if not contact.email:
        return "contact has no email address"
    if contact.email_status != SubscriptionStatus.subscribed:
        return f"email address {contact.email_status}"
    suppression = (
        await session.exec(
            select(Suppression)
            .where(col(Suppression.channel) == MessageChannel.email)
            .where(col(Suppression.address) == contact.email)
        )
    ).first()
    if suppression is not None:
        return f"address suppressed ({suppression.reason})"
    return None
