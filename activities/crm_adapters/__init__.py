"""CRM adapters: where a journey's sales tasks and CRM updates are synced to.

One module per adapter (``webhook``, ``hubspot``), each with a ``sync`` that takes the
task and its contact as plain dataclasses and reports what it made through ``progress``
as soon as it has made it, so a retry after a crash does not make it twice.

Errors: ``CrmRetryable`` (408, 425, 429, 5xx, network) is retried by the sync workflow;
``permanent`` raises a non-retryable ``ApplicationError`` (other 4xx, bad token, bad
configuration, a target the SSRF guard refuses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import httpx
from temporalio.exceptions import ApplicationError

from settings import Settings

RETRYABLE_STATUS = {408, 425, 429}


@dataclass
class CrmTaskData:
    id: str
    idempotency_key: str
    action: str  # create_task | update_contact
    note: str | None = None
    owner: str | None = None
    due_at: str | None = None  # ISO 8601, UTC
    created_at: str | None = None
    properties: dict[str, Any] = field(default_factory=dict)
    journey_key: str | None = None
    step_id: str | None = None
    external_id: str | None = None  # set when an earlier attempt already made the task


@dataclass
class CrmContactData:
    id: str
    email: str | None = None
    phone: str | None = None
    external_id: str | None = None
    lifecycle_stage: str | None = None
    score: int = 0
    attributes: dict[str, Any] = field(default_factory=dict)
    crm_id: str | None = None


@dataclass
class SyncResult:
    external_task_id: str | None = None
    crm_contact_id: str | None = None


class SyncProgress(Protocol):
    """Durable notes an adapter makes the moment the CRM has created something."""

    async def contact_synced(self, crm_id: str) -> None: ...

    async def task_created(self, external_id: str) -> None: ...


class CrmAdapter(Protocol):
    name: str

    async def sync(
        self, task: CrmTaskData, contact: CrmContactData, progress: SyncProgress
    ) -> SyncResult: ...


class CrmRetryable(Exception):
    """A failure worth retrying later (the CRM is down, busy or unreachable)."""


def permanent(message: str) -> ApplicationError:
    return ApplicationError(message, type="CrmSyncRefused", non_retryable=True)


def check_status(response: httpx.Response, what: str) -> None:
    """Raise the right error for a non-2xx answer."""
    status = response.status_code
    if 200 <= status < 300:
        return
    detail = response.text[:300]
    if status >= 500 or status in RETRYABLE_STATUS:
        raise CrmRetryable(f"{what} answered HTTP {status}; retrying: {detail}")
    raise permanent(f"{what} refused the call: HTTP {status}: {detail}")


def build_adapter(settings: Settings) -> CrmAdapter | None:
    """The adapter ``settings.crm_adapter`` names; None for ``none``."""
    if settings.crm_adapter == "webhook":
        from activities.crm_adapters.webhook import WebhookCrmAdapter

        return WebhookCrmAdapter(settings)
    if settings.crm_adapter == "hubspot":
        from activities.crm_adapters.hubspot import HubSpotAdapter

        return HubSpotAdapter(settings)
    return None
