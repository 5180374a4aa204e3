"""The webhook CRM adapter: a signed JSON POST to ``settings.crm_webhook_url``.

Body: ``{type: "task" | "contact_update", idempotency_key, contact: {...}, task: {...}}``,
signed like the webhook step (``X-Nurture-Signature: t=<unix>,v1=<hmac-sha256 hex of
"<t>.<body>">``, key ``crm_webhook_secret`` else ``webhook_secret``) with
``X-Nurture-Idempotency-Key`` so the receiver can drop a retried delivery. A JSON answer
may carry ``id`` (the receiver's task id) and ``contact_id`` (its contact id).
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx

from activities import outbound
from activities.crm_adapters import (
    CrmContactData,
    CrmRetryable,
    CrmTaskData,
    SyncProgress,
    SyncResult,
    check_status,
    permanent,
)
from activities.webhooks import sign
from settings import Settings


def payload(task: CrmTaskData, contact: CrmContactData) -> dict[str, Any]:
    return {
        "type": "task" if task.action == "create_task" else "contact_update",
        "idempotency_key": task.idempotency_key,
        "contact": {
            "id": contact.id,
            "email": contact.email,
            "phone": contact.phone,
            "external_id": contact.external_id,
            "lifecycle_stage": contact.lifecycle_stage,
            "score": contact.score,
            "attributes": contact.attributes,
        },
        "task": {
            "note": task.note,
            "owner": task.owner,
            "due_at": task.due_at,
            "properties": task.properties,
        },
    }


def _text_id(value: Any) -> str | None:
    return str(value) if isinstance(value, str | int) and str(value) else None


class WebhookCrmAdapter:
    name = "webhook"

    def __init__(self, settings: Settings) -> None:
        self.url = settings.crm_webhook_url
        self.secret = settings.crm_webhook_secret or settings.webhook_secret
        self.allow_private = settings.outbound_allow_private

    async def sync(
        self, task: CrmTaskData, contact: CrmContactData, progress: SyncProgress
    ) -> SyncResult:
        if not self.url:
            raise permanent("crm_adapter is webhook but NURTURE_CRM_WEBHOOK_URL is not set")
        body = json.dumps(payload(task, contact)).encode()
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "Nurture-CRM/1",
            "X-Nurture-Idempotency-Key": task.idempotency_key,
        }
        if self.secret:
            headers["X-Nurture-Signature"] = sign(self.secret, int(time.time()), body)
        try:
            response = await outbound.request(
                "POST", self.url, allow_private=self.allow_private, content=body, headers=headers
            )
        except httpx.HTTPError as err:
            raise CrmRetryable(f"CRM webhook {self.url} unreachable: {err}") from None
        check_status(response, f"CRM webhook {self.url}")
        try:
            answer = response.json()
        except ValueError:
            answer = None
        result = SyncResult()
        if isinstance(answer, dict):
            result.external_task_id = _text_id(answer.get("id"))
            result.crm_contact_id = _text_id(answer.get("contact_id"))
        if result.crm_contact_id:
            await progress.contact_synced(result.crm_contact_id)
        if result.external_task_id:
            await progress.task_created(result.external_task_id)
        return result
