"""send_email and send_sms: suppression checked at send time, one message per business key.

Order of work: the message row (unique business key) is committed before the provider
is called; a retry finds it and never sends a second copy. A paused journey holds: the
activity writes nothing and says so, and the workflow waits for the journey to resume.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Coroutine
from datetime import datetime, timedelta
from html import escape
from typing import Any, TypeVar

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.contacts import snapshot
from activities.counters import PROVIDER_ERRORS
from activities.providers import (
    EmailProvider,
    ProviderRejected,
    ProviderRetryable,
    SmsProvider,
)
from activities.providers.outbox import (
    OutboxEmailProvider,
    OutboxSmsProvider,
    OutgoingEmail,
    OutgoingSms,
)
from activities.providers.sendgrid import SendGridEmailProvider
from activities.providers.smtp import SmtpEmailProvider
from activities.providers.twilio_sms import TwilioSmsProvider
from activities.rendering import TemplateError, render_context, render_email, render_text
from api.tokens import sign, track_html, tracking_key
from models.contracts import SendMessageInput, SendMessageResult
from models.db import session_scope
from models.schedule import Window, resolve_zone, window_opens_at
from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Journey,
    JourneyStatus,
    Message,
    MessageChannel,
    MessageStatus,
    SubscriptionStatus,
    Suppression,
    Template,
    hashed_address,
    utcnow,
)
from settings import Settings

T = TypeVar("T")
# Well inside the send activity's heartbeat timeout (workflows/journey.py SEND_HEARTBEAT).
HEARTBEAT_SECONDS = 2.0
# A provider's Retry-After is honoured up to this; longer asks are retried sooner.
MAX_RETRY_AFTER_SECONDS = 3600.0


def email_provider(settings: Settings) -> EmailProvider:
    """The provider ``NURTURE_EMAIL_PROVIDER`` names, built from its settings."""
    match settings.email_provider:
        case "outbox":
            return OutboxEmailProvider(settings.outbox_path)
        case "sendgrid":
            return SendGridEmailProvider(
                _required(settings, "sendgrid", "sendgrid_api_key"), settings.sendgrid_base_url
            )
        case "smtp":
            return SmtpEmailProvider(
                _required(settings, "smtp", "smtp_host"),
                settings.smtp_port,
                settings.smtp_username,
                settings.smtp_password,
                settings.smtp_starttls,
            )
    raise ValueError(f"unknown email provider {settings.email_provider!r}")


def sms_provider(settings: Settings) -> SmsProvider:
    """The provider ``NURTURE_SMS_PROVIDER`` names, built from its settings."""
    match settings.sms_provider:
        case "outbox":
            return OutboxSmsProvider(settings.outbox_path)
        case "twilio":
            return TwilioSmsProvider(
                _required(settings, "twilio", "twilio_account_sid"),
                _required(settings, "twilio", "twilio_auth_token"),
                settings.sms_from,
                settings.twilio_base_url,
            )
    raise ValueError(f"unknown SMS provider {settings.sms_provider!r}")


def _with_unsubscribe_footer(
    html: str | None, text: str | None, url: str
) -> tuple[str | None, str | None]:
    """Both parts with a visible unsubscribe line unless the template already shows the link."""
    if html is not None and url not in html:
        link = escape(url, quote=True)
        html += f'\n<p style="font-size:12px"><a href="{link}">Unsubscribe</a></p>'
    if text is not None and url not in text:
        text += f"\n\n--\nUnsubscribe: {url}\n"
    return html, text


def _required(settings: Settings, provider: str, name: str) -> str:
    value = getattr(settings, name)
    if not value:
        raise ValueError(
            f"the {provider} provider needs NURTURE_{name.upper()}; set it or choose "
            "another provider"
        )
    return str(value)


class MessagingActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url
        self.email = email_provider(settings)
        self.sms = sms_provider(settings)

    @activity.defn(name="send_email")
    async def send_email(self, input: SendMessageInput) -> SendMessageResult:
        return await _heartbeating(self._send(MessageChannel.email, input))

    @activity.defn(name="send_sms")
    async def send_sms(self, input: SendMessageInput) -> SendMessageResult:
        return await _heartbeating(self._send(MessageChannel.sms, input))

    async def _send(self, channel: MessageChannel, input: SendMessageInput) -> SendMessageResult:
        async with session_scope(self.database_url) as session:
            message = await _message_by_key(session, input.idempotency_key)
            if message is None:
                if input.broadcast_id is None and await _journey_paused(session, input.journey_key):
                    return SendMessageResult(None, "held", "journey paused")
                deferred = await self._deferral(session, channel, input)
                if deferred is not None and input.broadcast_id is None:
                    return deferred
                # A broadcast is a one-time send at a chosen moment: over the cap or in
                # quiet hours, the contact is skipped (with the reason), not sent late.
                message = await self._record(
                    session, channel, input, deferred.reason if deferred else None
                )
        provider = self.email if channel == MessageChannel.email else self.sms
        if message.status not in (MessageStatus.pending, MessageStatus.sending):
            return SendMessageResult(str(message.id), message.status, message.skip_reason)
        if message.status == MessageStatus.sending and not provider.idempotent:
            # An earlier attempt died after calling the provider without an answer: it may
            # have been accepted, so it is never handed over again. Delivery events confirm.
            await self._set_status(message, MessageStatus.unconfirmed, MessageStatus.sending)
            return SendMessageResult(
                str(message.id),
                MessageStatus.unconfirmed,
                f"an earlier attempt may have reached {provider.name}; not sent again",
            )
        # Read in the transaction that marks the message sending: a failure here (the
        # database down) leaves it pending, provably not handed over, so the retry sends it.
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, message.contact_id)
            template = (
                await session.exec(select(Template).where(Template.key == input.template))
            ).first()
            if contact is not None and template is not None and message.to_address:
                await session.exec(
                    update(Message)
                    .where(col(Message.id) == message.id)
                    .where(col(Message.status) == MessageStatus.pending)
                    .values(status=MessageStatus.sending)
                )
        if contact is None or template is None or not message.to_address:
            return await self._fail(message, "contact or template vanished before the send")
        context = render_context(
            snapshot(contact).__dict__,
            {
                "key": input.journey_key,
                "version": input.journey_version,
                "step": input.step_id,
                "variant": input.variant,
            },
            input.trigger,
        )
        try:
            provider_id, subject = await self._deliver(channel, message, template, input, context)
        except (TemplateError, ProviderRejected) as err:
            if isinstance(err, ProviderRejected):
                PROVIDER_ERRORS.labels(channel, "rejected").inc()
            return await self._fail(message, str(err))
        except ProviderRetryable as err:
            PROVIDER_ERRORS.labels(channel, "retryable").inc()
            if not err.may_have_reached:
                # Provably not accepted: the retry may call the provider again.
                await self._set_status(message, MessageStatus.pending, MessageStatus.sending)
            if err.retry_after is not None:
                # The provider said when to come back (a rate limit): retry then, not sooner.
                wait = min(err.retry_after, MAX_RETRY_AFTER_SECONDS)
                raise ApplicationError(
                    str(err),
                    type=type(err).__name__,
                    next_retry_delay=timedelta(seconds=max(wait, 1.0)),
                ) from err
            raise
        async with session_scope(self.database_url) as session:
            stored = await session.get(Message, message.id)
            assert stored is not None
            if stored.status in (MessageStatus.pending, MessageStatus.sending):
                stored.status = MessageStatus.sent
                stored.sent_at = utcnow()
            stored.provider_message_id = provider_id
            stored.subject = subject
            session.add(stored)
        return SendMessageResult(str(message.id), MessageStatus.sent)

    async def _deliver(
        self,
        channel: MessageChannel,
        message: Message,
        template: Template,
        input: SendMessageInput,
        context: dict[str, Any],
    ) -> tuple[str | None, str | None]:
        assert message.to_address is not None
        if channel == MessageChannel.email:
            # RFC 8058 one-click unsubscribe, and the same link for templates to show.
            token = sign("unsubscribe", str(message.id), key=tracking_key(self.settings))
            unsubscribe_url = f"{self.settings.public_url.rstrip('/')}/u/{token}"
            context = {**context, "unsubscribe_url": unsubscribe_url}
            rendered = render_email(
                input.subject or template.subject, template.html, template.text, context
            )
            html, text = _with_unsubscribe_footer(rendered.html, rendered.text, unsubscribe_url)
            if html is not None and self.email.name != "sendgrid":
                # Our own open/click tracking; SendGrid tracks opens and clicks itself.
                html = track_html(
                    html,
                    base_url=self.settings.public_url,
                    message_id=str(message.id),
                    key=tracking_key(self.settings),
                    skip=unsubscribe_url,
                )
            email = OutgoingEmail(
                message_id=str(message.id),
                to=message.to_address,
                sender=self.settings.email_from,
                subject=rendered.subject,
                html=html,
                text=text,
                headers={
                    "List-Unsubscribe": f"<{unsubscribe_url}>",
                    "List-Unsubscribe-Post": "List-Unsubscribe=One-Click",
                },
                journey_key=input.journey_key or None,
                step_id=input.step_id,
                variant=input.variant,
            )
            return await asyncio.to_thread(self.email.send, email), rendered.subject
        body = render_text(template.text or "", context)
        sms = OutgoingSms(str(message.id), message.to_address, self.settings.sms_from, body)
        return await asyncio.to_thread(self.sms.send, sms), None

    async def _record(
        self,
        session: AsyncSession,
        channel: MessageChannel,
        input: SendMessageInput,
        held_back: str | None = None,
    ) -> Message:
        """Write the message row: pending, or skipped/failed with the reason it may not go."""
        contact = await session.get(Contact, uuid.UUID(input.contact_id))
        enrollment = (
            await session.get(Enrollment, uuid.UUID(input.enrollment_id))
            if input.enrollment_id
            else None
        )
        template = (
            await session.exec(select(Template).where(Template.key == input.template))
        ).first()
        journey = (
            await session.exec(select(Journey).where(Journey.key == input.journey_key))
        ).first()
        address = None
        if contact is not None:
            address = contact.email if channel == MessageChannel.email else contact.phone
        reason = await _skip_reason(
            session, channel, contact, enrollment, address, broadcast=input.broadcast_id is not None
        )
        reason = reason or held_back
        status = MessageStatus.skipped if reason else MessageStatus.pending
        if reason is None and (template is None or template.channel != channel):
            status, reason = MessageStatus.failed, f"no {channel} template {input.template!r}"
        values = {
            "id": uuid.uuid4(),
            "idempotency_key": input.idempotency_key,
            "contact_id": contact.id if contact else None,
            "enrollment_id": enrollment.id if enrollment else None,
            "journey_id": journey.id if journey else None,
            "step_id": input.step_id,
            "variant": input.variant,
            "journey_version": input.journey_version if journey else None,
            "channel": channel,
            "template_key": input.template,
            "to_address": address,
            "provider": (self.email if channel == MessageChannel.email else self.sms).name,
            "status": status,
            "skip_reason": reason,
            "created_at": utcnow(),
            "failed_at": utcnow() if status == MessageStatus.failed else None,
            "broadcast_id": uuid.UUID(input.broadcast_id) if input.broadcast_id else None,
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

    async def _deferral(
        self, session: AsyncSession, channel: MessageChannel, input: SendMessageInput
    ) -> SendMessageResult | None:
        """Quiet hours and the frequency cap defer a send (never drop it): when to retry."""
        email = channel == MessageChannel.email
        quiet = self.settings.email_quiet_hours if email else self.settings.sms_quiet_hours
        cap = self.settings.email_daily_cap if email else self.settings.sms_daily_cap
        if quiet is None and cap is None:
            return None
        now = datetime.fromisoformat(input.now) if input.now else utcnow()
        # The row lock makes two journeys sending to one contact count one after the other.
        contact = await session.get(Contact, uuid.UUID(input.contact_id), with_for_update=True)
        if contact is None:
            return None
        if quiet is not None:
            start, end = quiet.split("-")
            zone, _ = resolve_zone(contact.timezone, input.default_timezone)
            allowed = Window.parse(end, start, None)
            opens = window_opens_at(now, allowed, zone)
            if opens > now:
                return SendMessageResult(
                    None, "deferred", f"quiet hours {quiet}", retry_at=opens.isoformat()
                )
        if cap is not None:
            since = now - timedelta(days=1)
            recent = (
                await session.exec(
                    select(Message.created_at)
                    .where(Message.contact_id == contact.id)
                    .where(Message.channel == channel)
                    .where(col(Message.created_at) >= since)
                    .where(
                        col(Message.status).not_in([MessageStatus.skipped, MessageStatus.failed])
                    )
                    .order_by(col(Message.created_at))
                )
            ).all()
            if len(recent) >= cap:
                retry = recent[len(recent) - cap] + timedelta(days=1)
                return SendMessageResult(
                    None,
                    "deferred",
                    f"{cap} {channel} a day already sent",
                    retry_at=max(retry, now + timedelta(minutes=1)).isoformat(),
                )
        return None

    async def _set_status(
        self, message: Message, new: MessageStatus, expected: MessageStatus
    ) -> None:
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(Message)
                .where(col(Message.id) == message.id)
                .where(col(Message.status) == expected)
                .values(status=new)
            )

    async def _fail(self, message: Message, error: str) -> SendMessageResult:
        async with session_scope(self.database_url) as session:
            stored = await session.get(Message, message.id)
            assert stored is not None
            stored.status, stored.error, stored.failed_at = MessageStatus.failed, error, utcnow()
            session.add(stored)
        return SendMessageResult(str(message.id), MessageStatus.failed, error)


async def _heartbeating(work: Coroutine[Any, Any, T]) -> T:
    """Run ``work``, heartbeating every ``HEARTBEAT_SECONDS``: a worker that dies mid-send is
    noticed when its heartbeats stop (the workflow's heartbeat timeout), not at the end of
    the minute the send may take, so another worker retries it soon."""
    if not activity.in_activity():
        return await work
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=HEARTBEAT_SECONDS)
            if done:
                return task.result()
            activity.heartbeat()
    finally:
        task.cancel()


async def _message_by_key(session: AsyncSession, key: str) -> Message | None:
    return (await session.exec(select(Message).where(Message.idempotency_key == key))).first()


async def _journey_paused(session: AsyncSession, journey_key: str) -> bool:
    status = (await session.exec(select(Journey.status).where(Journey.key == journey_key))).first()
    return status == JourneyStatus.paused


async def _skip_reason(
    session: AsyncSession,
    channel: MessageChannel,
    contact: Contact | None,
    enrollment: Enrollment | None,
    address: str | None,
    *,
    broadcast: bool = False,
) -> str | None:
    if contact is None or contact.erased_at is not None:
        return "contact erased"
    if not broadcast and (enrollment is None or enrollment.status != EnrollmentStatus.active):
        return "enrollment no longer active"
    if not address:
        return f"contact has no {'email address' if channel == MessageChannel.email else 'phone'}"
    status = contact.email_status if channel == MessageChannel.email else contact.sms_status
    if status != SubscriptionStatus.subscribed:
        return f"{channel} {status}"
    suppression = (
        await session.exec(
            select(Suppression)
            .where(col(Suppression.channel) == channel)
            # An erased contact's address is kept only hashed (api.erasure), and must still
            # hold when the address comes back.
            .where(col(Suppression.address).in_([address, hashed_address(address)]))
        )
    ).first()
    if suppression is not None:
        return f"address suppressed ({suppression.reason})"
    return None
