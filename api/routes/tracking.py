"""Open and click tracking for providers that have none (the outbox and SMTP).

Not under /v1 and not behind the API key: the tokens are HMACs (api/tokens.py). The pixel
always answers a GIF, so mail clients never show a broken image; a click token that does not
verify is a 404, never a redirect, so these links cannot be used as an open redirect.
"""

from __future__ import annotations

import base64
import hashlib
import uuid
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, HTTPException, status
from fastapi.responses import RedirectResponse, Response
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.ratelimit import limit_tracking
from api.routes.webhooks import _signal_undelivered, _store_event, advance
from api.tokens import tracking_key, verify, verify_url
from models.tables import Message, MessageChannel, MessageStatus, utcnow
from settings import Settings

# Rate limited per client address and per token (api/ratelimit.py).
router = APIRouter(prefix="/t", tags=["tracking"], dependencies=[Depends(limit_tracking)])

SOURCE = "tracking"
PIXEL = base64.b64decode("R0lGODlhAQABAIAAAAAAAP///yH5BAEAAAAALAAAAAABAAEAAAIBRAA7")
NO_STORE = {"Cache-Control": "no-store"}


def _uuid(value: str | None) -> uuid.UUID | None:
    try:
        return uuid.UUID(value or "")
    except ValueError:
        return None


async def _record(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    message_id: uuid.UUID,
    idempotency_id: str,
    name: str,
    properties: dict[str, str],
    new: MessageStatus,
) -> bool:
    """Store the event once, move the message forward, signal; False if no such email."""
    message = await session.get(Message, message_id, with_for_update=True)
    if message is None or message.channel != MessageChannel.email:
        return False
    now = utcnow()
    stored = await _store_event(
        session,
        idempotency_id,
        message.contact_id,
        name,
        {"message_id": str(message.id), "template": message.template_key, **properties},
        now,
        SOURCE,
    )
    if stored:
        advance(message, new, now)
        session.add(message)
    # Commit before signalling: an event is stored before anything acts on it.
    await session.commit()
    await _signal_undelivered(session, temporal, settings, [idempotency_id])
    return True


@router.get("/o/{token}.gif")
async def opened(
    token: str, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> Response:
    """The open pixel: a 1x1 transparent GIF whatever the token; a genuine one records it."""
    message_id = _uuid(verify("open", token, key=tracking_key(settings)))
    if message_id is not None:
        await _record(
            session,
            temporal,
            settings,
            message_id,
            f"open:{message_id}",
            "email_opened",
            {},
            MessageStatus.opened,
        )
    return Response(PIXEL, media_type="image/gif", headers=NO_STORE)


@router.get("/c/{token}")
async def clicked(
    token: str, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> RedirectResponse:
    """A tracked link: records the click and redirects to the signed URL; 404 if forged."""
    verified = verify_url("click", token, key=tracking_key(settings))
    message_id = _uuid(verified[0]) if verified else None
    url = verified[1] if verified else ""
    parts = urlsplit(url)
    if message_id is None or parts.scheme not in ("http", "https") or not parts.netloc:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown link")
    digest = hashlib.sha256(url.encode()).hexdigest()[:16]
    found = await _record(
        session,
        temporal,
        settings,
        message_id,
        f"click:{message_id}:{digest}",
        "email_clicked",
        {"url": url},
        MessageStatus.clicked,
    )
    if not found:
        raise HTTPException(status.HTTP_404_NOT_FOUND, "unknown link")
    return RedirectResponse(url, status.HTTP_302_FOUND, headers=NO_STORE)
