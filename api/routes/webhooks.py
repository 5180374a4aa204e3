"""Provider webhooks (SendGrid events, Twilio status and inbound SMS) that become signals.

Not under /v1 and not behind the API key: each request is authenticated by its
provider's signature over the raw request, checked before anything is parsed or stored.
Every provider event is stored once (its provider id is the idempotency id), applied to
our message and the contact's subscription in the same transaction, then signalled to
the contact's running journeys.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_der_public_key
from fastapi import APIRouter, HTTPException, Request, Response, status
from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from twilio.request_validator import RequestValidator

from activities.counters import EVENTS_RECEIVED, WEBHOOK_VERIFICATION_FAILURES
from activities.delivery import dispatch_undelivered, or_defer
from api.deps import SessionDep, SettingsDep, TemporalDep
from models.tables import (
    Contact,
    Event,
    Message,
    MessageChannel,
    MessageStatus,
    SubscriptionStatus,
    Suppression,
    SuppressionReason,
    utcnow,
)
from settings import Settings

log = logging.getLogger(__name__)

router = APIRouter(prefix="/webhooks", tags=["webhooks"])

SENDGRID_SIGNATURE = "X-Twilio-Email-Event-Webhook-Signature"
SENDGRID_TIMESTAMP = "X-Twilio-Email-Event-Webhook-Timestamp"
SENDGRID_MAX_EVENTS = 1000
MESSAGE_ID_ARG = "nurture_message_id"  # the custom arg our email providers set

SENDGRID_EVENT_NAMES = {
    "processed": "email_processed",
    "deferred": "email_deferred",
    "delivered": "email_delivered",
    "open": "email_opened",
    "click": "email_clicked",
    "bounce": "email_bounced",
    "dropped": "email_dropped",
    "spamreport": "email_spam_reported",
    "unsubscribe": "email_unsubscribed",
    "group_unsubscribe": "email_group_unsubscribed",
    "group_resubscribe": "email_group_resubscribed",
}
SENDGRID_MESSAGE_STATUS = {
    "processed": MessageStatus.sent,
    "delivered": MessageStatus.delivered,
    "open": MessageStatus.opened,
    "click": MessageStatus.clicked,
    "bounce": MessageStatus.bounced,
    "dropped": MessageStatus.failed,
    "spamreport": MessageStatus.complained,
    "unsubscribe": MessageStatus.unsubscribed,
    "group_unsubscribe": MessageStatus.unsubscribed,
}
SENDGRID_SUPPRESSION = {
    "bounce": SuppressionReason.bounced,
    "spamreport": SuppressionReason.complained,
    "unsubscribe": SuppressionReason.unsubscribed,
    "group_unsubscribe": SuppressionReason.unsubscribed,
}
# What journeys may need from a SendGrid event; the rest (address, IP, user agent,
# SMTP id, other custom args) is personal data or noise and is not stored.
SENDGRID_KEPT = (
    "event",
    "sg_event_id",
    "sg_message_id",
    "category",
    "url",
    "reason",
    "status",
    "type",
    "bounce_classification",
    "attempt",
    "response",
    "asm_group_id",
    "sg_machine_open",
    "marketing_campaign_id",
    "marketing_campaign_name",
)

TWILIO_STATUS = {
    "sending": MessageStatus.sent,
    "sent": MessageStatus.sent,
    "delivered": MessageStatus.delivered,
    "undelivered": MessageStatus.failed,
    "failed": MessageStatus.failed,
}
TWILIO_EVENT_NAMES = {
    "delivered": "sms_delivered",
    "undelivered": "sms_failed",
    "failed": "sms_failed",
}
# Twilio's standard opt-out and opt-in keywords.
SMS_OPT_OUT = {"STOP", "STOPALL", "UNSUBSCRIBE", "END", "QUIT", "REVOKE", "OPTOUT", "CANCEL"}
SMS_OPT_IN = {"START", "YES", "UNSTOP"}
# How far a signed SendGrid request's timestamp may be from now (clock skew included).
SENDGRID_FRESHNESS = timedelta(minutes=15)
EMPTY_TWIML = '<?xml version="1.0" encoding="UTF-8"?><Response></Response>'

# Progress only moves forward; the terminal outcomes (and a skipped message) never change.
_RANK = {
    MessageStatus.pending: 0,
    MessageStatus.sending: 0,
    MessageStatus.unconfirmed: 0,
    MessageStatus.sent: 1,
    MessageStatus.delivered: 2,
    MessageStatus.opened: 3,
    MessageStatus.clicked: 4,
}
_TIMESTAMP_COLUMN = {
    MessageStatus.sent: "sent_at",
    MessageStatus.delivered: "delivered_at",
    MessageStatus.opened: "opened_at",
    MessageStatus.clicked: "clicked_at",
    MessageStatus.bounced: "bounced_at",
    MessageStatus.complained: "complained_at",
    MessageStatus.unsubscribed: "unsubscribed_at",
    MessageStatus.failed: "failed_at",
}


def advance(message: Message, new: MessageStatus, at: datetime) -> None:
    """Move ``message`` to ``new`` unless that is a step back; record when, the first time."""
    column = _TIMESTAMP_COLUMN.get(new)
    if column is not None and getattr(message, column) is None:
        setattr(message, column, at)
    current = _RANK.get(message.status)
    if current is not None and _RANK.get(new, len(_RANK)) > current:
        message.status = new


def verify_sendgrid(public_key: str | None, signature: str, timestamp: str, body: bytes) -> bool:
    """SendGrid's Event Webhook signature: ECDSA P-256 / SHA-256 over timestamp + raw body."""
    if not public_key or not signature or not timestamp:
        return False
    try:
        key = load_der_public_key(base64.b64decode(public_key))
        if not isinstance(key, ec.EllipticCurvePublicKey):
            return False
        key.verify(
            base64.b64decode(signature), timestamp.encode() + body, ec.ECDSA(hashes.SHA256())
        )
    except (InvalidSignature, ValueError, binascii.Error):
        return False
    return True


def _occurred_at(value: Any) -> datetime:
    """SendGrid timestamps are Unix seconds, though some documented ones are milliseconds."""
    if isinstance(value, int | float) and value > 0:
        seconds = value / 1000 if value > 100_000_000_000 else value
        return datetime.fromtimestamp(seconds, UTC)
    return utcnow()


def _uuid(value: Any) -> uuid.UUID | None:
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


async def _store_event(
    session: AsyncSession,
    idempotency_id: str,
    contact_id: uuid.UUID | None,
    name: str,
    properties: dict[str, Any],
    occurred_at: datetime,
    source: str,
) -> bool:
    """Insert the event unless its idempotency id is known; return whether it is new."""
    inserted = await session.exec(
        insert(Event)
        .values(
            id=uuid.uuid4(),
            idempotency_id=idempotency_id,
            contact_id=contact_id,
            name=name,
            properties=properties,
            occurred_at=occurred_at,
            received_at=utcnow(),
            source=source,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_id"])
        .returning(col(Event.id))
    )
    new = inserted.first() is not None
    if new:
        EVENTS_RECEIVED.labels(source).inc()
    return new


async def _suppress(
    session: AsyncSession,
    channel: MessageChannel,
    address: str,
    reason: SuppressionReason,
    source: str,
) -> None:
    await session.exec(
        insert(Suppression)
        .values(
            id=uuid.uuid4(),
            channel=channel,
            address=address,
            reason=reason,
            source=source,
            created_at=utcnow(),
        )
        .on_conflict_do_nothing(constraint="uq_suppressions")
    )


async def _signal_undelivered(
    session: AsyncSession, temporal: Client, settings: Settings, idempotency_ids: list[str]
) -> None:
    """Signal each event not yet delivered (a provider retry finishes an interrupted run),
    start the journeys they trigger, then refresh their contacts' scores and segments.
    With Temporal unreachable they stay undelivered, for the inbox drain."""
    if not idempotency_ids:
        return
    events = (
        await session.exec(
            select(Event)
            .where(col(Event.idempotency_id).in_(idempotency_ids))
            .where(col(Event.delivered_at).is_(None))
            .order_by(col(Event.occurred_at))
        )
    ).all()
    if events:
        await or_defer(
            session,
            temporal,
            lambda: dispatch_undelivered(session, temporal, settings, events),
            f"{len(events)} event(s)",
        )


@router.post("/sendgrid")
async def sendgrid_events(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> dict[str, int]:
    """SendGrid's Event Webhook: a signed JSON array of up to 1,000 events."""
    body = await request.body()
    stamp = request.headers.get(SENDGRID_TIMESTAMP, "")
    if not verify_sendgrid(
        settings.sendgrid_webhook_public_key,
        request.headers.get(SENDGRID_SIGNATURE, ""),
        stamp,
        body,
    ):
        WEBHOOK_VERIFICATION_FAILURES.labels("sendgrid").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid or missing SendGrid signature")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > SENDGRID_FRESHNESS.total_seconds():
        # A captured request replayed later: its signature is valid, its moment is not.
        WEBHOOK_VERIFICATION_FAILURES.labels("sendgrid").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "stale SendGrid signature timestamp")
    try:
        payload = json.loads(body)
    except ValueError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body is not JSON: {err}") from err
    if not isinstance(payload, list) or not all(isinstance(e, dict) for e in payload):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body must be a JSON array of events")
    if len(payload) > SENDGRID_MAX_EVENTS:
        raise HTTPException(
            status.HTTP_413_CONTENT_TOO_LARGE,
            f"{len(payload)} events in one batch; at most {SENDGRID_MAX_EVENTS}",
        )

    ids: list[str] = []
    new = 0
    for raw in payload:
        kind = raw.get("event")
        sg_event_id = raw.get("sg_event_id")
        if kind not in SENDGRID_EVENT_NAMES or not sg_event_id:
            log.info("SendGrid event ignored: type %r, sg_event_id %r", kind, sg_event_id)
            continue
        idempotency_id = f"sendgrid:{sg_event_id}"
        ids.append(idempotency_id)
        if await _apply_sendgrid_event(session, idempotency_id, kind, raw):
            new += 1
    # Commit before signalling: an event is stored before anything acts on it.
    await session.commit()
    await _signal_undelivered(session, temporal, settings, ids)
    return {"received": len(payload), "stored": new}


async def _apply_sendgrid_event(
    session: AsyncSession, idempotency_id: str, kind: str, raw: dict[str, Any]
) -> bool:
    message_id = _uuid(raw.get(MESSAGE_ID_ARG))
    message = await session.get(Message, message_id, with_for_update=True) if message_id else None
    email = str(raw.get("email") or "").strip().lower() or None
    contact: Contact | None = None
    if message is not None and message.contact_id is not None:
        contact = await session.get(Contact, message.contact_id)
    elif email:
        contact = (await session.exec(select(Contact).where(Contact.email == email))).first()
    properties = {k: raw[k] for k in SENDGRID_KEPT if k in raw}
    if message is not None:
        properties.update(message_id=str(message.id), template=message.template_key)
    occurred_at = _occurred_at(raw.get("timestamp"))
    stored = await _store_event(
        session,
        idempotency_id,
        contact.id if contact else None,
        SENDGRID_EVENT_NAMES[kind],
        properties,
        occurred_at,
        "sendgrid",
    )
    if not stored:
        return False
    new_status = SENDGRID_MESSAGE_STATUS.get(kind)
    if message is not None and new_status is not None:
        advance(message, new_status, occurred_at)
        session.add(message)
    reason = SENDGRID_SUPPRESSION.get(kind)
    address = (message.to_address if message else None) or email
    if reason is not None and address:
        await _suppress(session, MessageChannel.email, address.lower(), reason, "sendgrid")
        if contact is not None and contact.email_status == SubscriptionStatus.subscribed:
            contact.email_status = SubscriptionStatus(reason.value)
            contact.updated_at = utcnow()
            session.add(contact)
    return True


def _twilio_request_valid(
    request: Request, body: bytes, public_url: str, auth_token: str | None
) -> bool:
    """Twilio signs the URL it was configured with (our public one), not the one we see."""
    signature = request.headers.get("X-Twilio-Signature", "")
    if not auth_token or not signature:
        return False
    url = public_url.rstrip("/") + request.url.path
    if request.url.query:
        url += "?" + request.url.query
    params = dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
    return bool(RequestValidator(auth_token).validate(url, params, signature))


async def _twilio_form(request: Request, settings: SettingsDep) -> dict[str, str]:
    """The form Twilio posted, once its X-Twilio-Signature has been checked."""
    body = await request.body()
    token = settings.twilio_auth_token
    if not _twilio_request_valid(request, body, settings.public_url, token):
        WEBHOOK_VERIFICATION_FAILURES.labels("twilio").inc()
        raise HTTPException(status.HTTP_403_FORBIDDEN, "invalid or missing Twilio signature")
    return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))


@router.post("/twilio/status")
async def twilio_status(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> Response:
    """Twilio's message status callback: moves our SMS forward, never back."""
    form = await _twilio_form(request, settings)
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    twilio_status = (form.get("MessageStatus") or form.get("SmsStatus") or "").lower()
    if not sid or not twilio_status:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "MessageSid and MessageStatus required")
    message = (
        await session.exec(
            select(Message)
            .where(Message.channel == MessageChannel.sms)
            .where(Message.provider_message_id == sid)
            .with_for_update()
        )
    ).first()
    now = utcnow()
    name = TWILIO_EVENT_NAMES.get(twilio_status)
    idempotency_id = f"twilio:{sid}:{twilio_status}"
    stored = True
    if name is not None:
        properties: dict[str, Any] = {"message_sid": sid, "status": twilio_status}
        if form.get("ErrorCode"):
            properties["error_code"] = form["ErrorCode"]
        if message is not None:
            properties.update(message_id=str(message.id), template=message.template_key)
        stored = await _store_event(
            session,
            idempotency_id,
            message.contact_id if message else None,
            name,
            properties,
            now,
            "twilio",
        )
    new_status = TWILIO_STATUS.get(twilio_status)
    if stored and message is not None and new_status is not None:
        advance(message, new_status, now)
        if new_status == MessageStatus.failed and form.get("ErrorCode") and not message.error:
            message.error = f"Twilio error {form['ErrorCode']} ({twilio_status})"
        session.add(message)
    await session.commit()
    if name is not None:
        await _signal_undelivered(session, temporal, settings, [idempotency_id])
    return Response(status_code=status.HTTP_204_NO_CONTENT)


@router.post("/twilio/inbound")
async def twilio_inbound(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> Response:
    """An SMS to our number: opt-out and opt-in keywords, and an ``sms_received`` event."""
    form = await _twilio_form(request, settings)
    phone = form.get("From", "").strip()
    text = form.get("Body", "")
    sid = form.get("MessageSid") or form.get("SmsSid") or ""
    if not phone or not sid:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "From and MessageSid required")
    contact = (
        await session.exec(
            select(Contact)
            .where(Contact.phone == phone)
            .where(col(Contact.erased_at).is_(None))
            .order_by(col(Contact.created_at))
        )
    ).first()
    keyword = text.strip().upper()
    properties: dict[str, Any] = {"body": text, "message_sid": sid, "to": form.get("To")}
    if keyword in SMS_OPT_OUT:
        properties["opt"] = "out"
    elif keyword in SMS_OPT_IN:
        properties["opt"] = "in"
    idempotency_id = f"twilio:{sid}"
    stored = await _store_event(
        session,
        idempotency_id,
        contact.id if contact else None,
        "sms_received",
        properties,
        utcnow(),
        "twilio",
    )
    if stored and keyword in SMS_OPT_OUT:
        await _suppress(session, MessageChannel.sms, phone, SuppressionReason.sms_opt_out, "twilio")
        if contact is not None:
            contact.sms_status = SubscriptionStatus.unsubscribed
    elif stored and keyword in SMS_OPT_IN:
        # Only the keyword's own opt-out is lifted; an operator's manual block stays.
        await session.exec(
            delete(Suppression)
            .where(col(Suppression.channel) == MessageChannel.sms)
            .where(col(Suppression.address) == phone)
            .where(col(Suppression.reason) == SuppressionReason.sms_opt_out)
        )
        if contact is not None and contact.sms_status == SubscriptionStatus.unsubscribed:
            contact.sms_status = SubscriptionStatus.subscribed
    if stored and contact is not None and "opt" in properties:
        contact.updated_at = utcnow()
        session.add(contact)
    await session.commit()
    await _signal_undelivered(session, temporal, settings, [idempotency_id])
    # Twilio replies to the keywords itself (Advanced Opt-Out); we answer with no message.
    return Response(EMPTY_TWIML, media_type="application/xml")
