"""Unsubscribe links in mail: RFC 8058 one-click POST and a small confirmation page.

Not under /v1 and not behind the API key: the token in the path is an HMAC over the
message id (api/tokens.py). GET only shows the page; only a POST unsubscribes, so mail
scanners that follow links change nothing. Unsubscribing again is harmless.
"""

from __future__ import annotations

import html
import uuid
from urllib.parse import parse_qsl

from fastapi import APIRouter, Depends, HTTPException, Request, status
from fastapi.responses import HTMLResponse

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.ratelimit import limit_unsubscribe
from api.routes.webhooks import _signal_undelivered, _store_event, _suppress, advance
from api.tokens import tracking_key, verify
from models.tables import (
    Contact,
    Message,
    MessageChannel,
    MessageStatus,
    SubscriptionStatus,
    SuppressionReason,
    utcnow,
)
from settings import Settings

# Rate limited per client address and per token (api/ratelimit.py).
router = APIRouter(prefix="/u", tags=["compliance"], dependencies=[Depends(limit_unsubscribe)])

TOKEN_KIND = "unsubscribe"
SOURCE = "list-unsubscribe"


def _message_id(settings: Settings, token: str) -> uuid.UUID:
    """The message a genuine token names; 404 for anything forged or garbled."""
    message_id = verify(TOKEN_KIND, token, key=tracking_key(settings))
    try:
        return uuid.UUID(message_id or "")
    except ValueError:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown unsubscribe link") from None


def _page(title: str, body: str) -> HTMLResponse:
    return HTMLResponse(
        '<!doctype html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title></head>"
        f"<body><h1>{html.escape(title)}</h1>{body}</body></html>"
    )


@router.get("/{token}", response_class=HTMLResponse)
async def unsubscribe_page(token: str, session: SessionDep, settings: SettingsDep) -> HTMLResponse:
    """The preference page: says which address, offers a button; changes nothing."""
    message = await session.get(Message, _message_id(settings, token))
    if message is None or message.channel != MessageChannel.email:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown unsubscribe link")
    address = html.escape(message.to_address or "this address")
    return _page(
        "Unsubscribe",
        f"<p>Stop all marketing email to <strong>{address}</strong>?</p>"
        f'<form method="post" action="/u/{html.escape(token)}">'
        '<input type="hidden" name="action" value="unsubscribe">'
        '<button type="submit">Unsubscribe</button></form>',
    )


@router.post("/{token}", response_class=HTMLResponse)
async def unsubscribe(
    token: str,
    request: Request,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> HTMLResponse:
    """RFC 8058 one-click (``List-Unsubscribe=One-Click``) or the page's button."""
    message_id = _message_id(settings, token)
    form = dict(parse_qsl((await request.body()).decode("utf-8", "replace")))
    if form.get("List-Unsubscribe") != "One-Click" and form.get("action") != "unsubscribe":
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "expected List-Unsubscribe=One-Click or action=unsubscribe"
        )
    message = await session.get(Message, message_id, with_for_update=True)
    if message is None or message.channel != MessageChannel.email:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown unsubscribe link")
    contact = await session.get(Contact, message.contact_id) if message.contact_id else None
    now = utcnow()
    idempotency_id = f"{TOKEN_KIND}:{message.id}"
    stored = await _store_event(
        session,
        idempotency_id,
        contact.id if contact else None,
        "email_unsubscribed",
        {"message_id": str(message.id), "template": message.template_key},
        now,
        SOURCE,
    )
    if stored:
        advance(message, MessageStatus.unsubscribed, now)
        session.add(message)
        if message.to_address:
            await _suppress(
                session,
                MessageChannel.email,
                message.to_address.lower(),
                SuppressionReason.unsubscribed,
                SOURCE,
            )
        if contact is not None and contact.email_status == SubscriptionStatus.subscribed:
            contact.email_status = SubscriptionStatus.unsubscribed
            contact.updated_at = now
            session.add(contact)
    # Commit before signalling: an event is stored before anything acts on it.
    await session.commit()
    await _signal_undelivered(session, temporal, settings, [idempotency_id])
    return _page("Unsubscribed", "<p>You will not receive marketing email from us again.</p>")
