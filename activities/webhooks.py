"""The ``webhook`` step: a signed HTTP call with a templated body, once per business key.

The body is signed with HMAC-SHA256 over ``<timestamp>.<body>`` (header
``X-Nurture-Signature: t=<unix seconds>,v1=<hex>``) and carries
``X-Nurture-Idempotency-Key`` so the receiver can drop a retried delivery.
2xx completes; 408, 429, 5xx and network errors are retried; other 4xx are permanent.
The URL goes through the SSRF guard in ``activities.outbound``: a private or loopback
target is refused (non-retryable ``OutboundRefused``) and redirects are not followed.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import uuid
from typing import Any

import httpx
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import select
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities import outbound
from activities.contacts import snapshot
from activities.rendering import render_context, render_text
from models.contracts import WebhookInput, WebhookResult
from models.db import session_scope
from models.tables import Contact, WebhookCall, utcnow
from settings import Settings

RETRYABLE = {408, 425, 429}


def sign(secret: str, timestamp: int, body: bytes) -> str:
    digest = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256)
    return f"t={timestamp},v1={digest.hexdigest()}"


def _render_body(body: Any, context: dict[str, Any]) -> Any:
    if isinstance(body, str):
        return render_text(body, context)
    if isinstance(body, dict):
        return {k: _render_body(v, context) for k, v in body.items()}
    if isinstance(body, list):
        return [_render_body(v, context) for v in body]
    return body


class WebhookActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url

    @activity.defn(name="call_webhook")
    async def call_webhook(self, input: WebhookInput) -> WebhookResult:
        async with session_scope(self.database_url) as session:
            await session.exec(
                insert(WebhookCall)
                .values(
                    id=uuid.uuid4(),
                    idempotency_key=input.idempotency_key,
                    contact_id=uuid.UUID(input.contact_id),
                    journey_key=input.journey_key,
                    step_id=input.step_id,
                    url=input.url,
                    method=input.method,
                    attempts=0,
                    created_at=utcnow(),
                )
                .on_conflict_do_nothing(index_elements=["idempotency_key"])
            )
            call = (
                await session.exec(
                    select(WebhookCall).where(WebhookCall.idempotency_key == input.idempotency_key)
                )
            ).one()
            if call.completed_at is not None and call.status_code is not None:
                return WebhookResult(call.status_code)
            contact = await session.get(Contact, uuid.UUID(input.contact_id))
            call.attempts += 1
            session.add(call)
        facts = snapshot(contact).__dict__ if contact is not None else {}
        context = render_context(
            facts, {"key": input.journey_key, "step": input.step_id}, input.trigger
        )
        rendered = _render_body(input.body, context)
        if rendered is None:
            content = b""
            content_type = None
        elif isinstance(rendered, str):
            content, content_type = rendered.encode(), "text/plain; charset=utf-8"
        else:
            content, content_type = json.dumps(rendered).encode(), "application/json"
        headers = {
            **input.headers,
            "User-Agent": "Nurture-Webhook/1",
            "X-Nurture-Idempotency-Key": input.idempotency_key,
        }
        if content_type:
            headers["Content-Type"] = content_type
        if self.settings.webhook_secret:
            headers["X-Nurture-Signature"] = sign(
                self.settings.webhook_secret, int(time.time()), content
            )
        try:
            response = await outbound.request(
                input.method,
                input.url,
                allow_private=self.settings.outbound_allow_private,
                content=content or None,
                headers=headers,
            )
        except httpx.HTTPError as err:
            raise RuntimeError(f"webhook {input.url} unreachable: {err}") from None
        status = response.status_code
        if status >= 500 or status in RETRYABLE:
            raise RuntimeError(f"webhook {input.url} answered {status}; retrying")
        async with session_scope(self.database_url) as session:
            stored = (
                await session.exec(
                    select(WebhookCall).where(WebhookCall.idempotency_key == input.idempotency_key)
                )
            ).one()
            stored.status_code, stored.completed_at = status, utcnow()
            session.add(stored)
        if status >= 400:
            raise ApplicationError(
                f"webhook {input.url} refused the call: HTTP {status}",
                type="WebhookRefused",
                non_retryable=True,
            )
        return WebhookResult(status)
