"""The HubSpot adapter: CRM v3 REST over httpx (shapes in shared/reference/hubspot-crm.json).

The contact is upserted by email (``POST /crm/v3/objects/contacts/batch/upsert`` with
``idProperty: email``), or patched by its HubSpot id when it has no email; a
``create_task`` then makes ``POST /crm/v3/objects/tasks`` associated to it (type 204,
task to contact). Property values are strings, as HubSpot wants them.

Idempotency: the contact upsert is naturally idempotent. The task id is recorded the
moment HubSpot answers, and a task with a recorded id is never created again. What
remains is the window in which HubSpot created the task but its answer was lost (a
timeout, a dropped connection): the retry then creates a second task. The reference we
build on documents no search endpoint to find the first one by a unique property, so we
accept that rare duplicate rather than guess an API.
"""

from __future__ import annotations

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
from settings import Settings

LIFECYCLE_STAGES = {
    "subscriber": "subscriber",
    "lead": "lead",
    "mql": "marketingqualifiedlead",
    "sql": "salesqualifiedlead",
    "opportunity": "opportunity",
    "customer": "customer",
    "evangelist": "evangelist",
}
TASK_TO_CONTACT = 204
TASK_PRIORITIES = {"LOW", "MEDIUM", "HIGH"}
TASK_TYPES = {"EMAIL", "CALL", "TODO"}


def _first(attributes: dict[str, Any], *names: str) -> str | None:
    for name in names:
        value = attributes.get(name)
        if value not in (None, ""):
            return str(value)
    return None


def contact_properties(contact: CrmContactData) -> dict[str, str]:
    attributes = contact.attributes
    candidates = {
        "email": contact.email,
        "firstname": _first(attributes, "first_name", "firstname", "firstName"),
        "lastname": _first(attributes, "last_name", "lastname", "lastName"),
        "phone": contact.phone,
        "lifecyclestage": LIFECYCLE_STAGES.get(contact.lifecycle_stage or ""),
    }
    return {name: value for name, value in candidates.items() if value}


def _hubspot_time(iso: str | None) -> str | None:
    return iso.replace("+00:00", "Z") if iso else None


def task_properties(task: CrmTaskData) -> dict[str, str]:
    note = (task.note or "").strip()
    subject = note.splitlines()[0][:200] if note else ""
    if not subject:
        subject = f"Nurture follow-up ({task.journey_key or 'journey'} / {task.step_id or 'crm'})"
    body = note
    if task.owner and not task.owner.isdigit():
        # HubSpot assigns by owner id; a name or address is kept readable in the body.
        body = f"{body}\n\nOwner: {task.owner}".strip()
    priority = str(task.properties.get("priority", "")).upper()
    kind = str(task.properties.get("type", "")).upper()
    properties = {
        "hs_task_subject": subject,
        "hs_task_body": body,
        "hs_timestamp": _hubspot_time(task.due_at or task.created_at) or "",
        "hs_task_status": "NOT_STARTED",
        "hs_task_priority": priority if priority in TASK_PRIORITIES else "MEDIUM",
        "hs_task_type": kind if kind in TASK_TYPES else "TODO",
    }
    if task.owner and task.owner.isdigit():
        properties["hubspot_owner_id"] = task.owner
    # HubSpot's own task properties given in the step pass through as they are.
    for name, value in task.properties.items():
        if (name.startswith("hs_task_") or name == "hubspot_owner_id") and value is not None:
            properties[name] = str(value)
    return {name: value for name, value in properties.items() if value != ""}


class HubSpotAdapter:
    name = "hubspot"

    def __init__(self, settings: Settings) -> None:
        self.base_url = settings.hubspot_base_url.rstrip("/")
        self.token = settings.hubspot_token
        self.allow_private = settings.outbound_allow_private

    async def _call(self, method: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
        url = f"{self.base_url}{path}"
        try:
            response = await outbound.request(
                method,
                url,
                allow_private=self.allow_private,
                json=body,
                headers={
                    "Authorization": f"Bearer {self.token}",
                    "Accept": "application/json",
                    "User-Agent": "Nurture-CRM/1",
                },
                timeout_seconds=20,
            )
        except httpx.HTTPError as err:
            raise CrmRetryable(f"HubSpot {method} {path} unreachable: {err}") from None
        if response.status_code in (401, 403):
            raise permanent(
                f"HubSpot refused the token (HTTP {response.status_code} on {method} {path}): "
                "check NURTURE_HUBSPOT_TOKEN (a private-app token allowed to write contacts "
                "and tasks)"
            )
        check_status(response, f"HubSpot {method} {path}")
        try:
            answer = response.json()
        except ValueError:
            raise CrmRetryable(f"HubSpot {method} {path} answered non-JSON") from None
        if not isinstance(answer, dict):
            raise CrmRetryable(f"HubSpot {method} {path} answered an unexpected shape")
        return answer

    async def _sync_contact(self, contact: CrmContactData) -> str:
        properties = contact_properties(contact)
        if contact.email:
            answer = await self._call(
                "POST",
                "/crm/v3/objects/contacts/batch/upsert",
                {
                    "inputs": [
                        {"idProperty": "email", "id": contact.email, "properties": properties}
                    ]
                },
            )
            results = answer.get("results") or []
            if not results or not results[0].get("id"):
                errors = answer.get("errors") or [{}]
                raise permanent(
                    f"HubSpot did not upsert contact {contact.email}: "
                    f"{errors[0].get('message') or answer}"
                )
            return str(results[0]["id"])
        if contact.crm_id:
            answer = await self._call(
                "PATCH", f"/crm/v3/objects/contacts/{contact.crm_id}", {"properties": properties}
            )
            return str(answer.get("id") or contact.crm_id)
        if not ({"firstname", "lastname"} & properties.keys()):
            raise permanent(
                f"contact {contact.id} has no email and no name: HubSpot needs one to keep it"
            )
        answer = await self._call("POST", "/crm/v3/objects/contacts", {"properties": properties})
        if not answer.get("id"):
            raise CrmRetryable(f"HubSpot created contact {contact.id} without an id: {answer}")
        return str(answer["id"])

    async def sync(
        self, task: CrmTaskData, contact: CrmContactData, progress: SyncProgress
    ) -> SyncResult:
        if not self.token:
            raise permanent("crm_adapter is hubspot but NURTURE_HUBSPOT_TOKEN is not set")
        crm_contact_id = await self._sync_contact(contact)
        if crm_contact_id != contact.crm_id:
            await progress.contact_synced(crm_contact_id)
        result = SyncResult(crm_contact_id=crm_contact_id)
        if task.action != "create_task":
            return result
        if task.external_id:
            result.external_task_id = task.external_id
            return result
        answer = await self._call(
            "POST",
            "/crm/v3/objects/tasks",
            {
                "properties": task_properties(task),
                "associations": [
                    {
                        "to": {"id": crm_contact_id},
                        "types": [
                            {
                                "associationCategory": "HUBSPOT_DEFINED",
                                "associationTypeId": TASK_TO_CONTACT,
                            }
                        ],
                    }
                ],
            },
        )
        if not answer.get("id"):
            raise CrmRetryable(f"HubSpot created a task without an id: {answer}")
        result.external_task_id = str(answer["id"])
        await progress.task_created(result.external_task_id)
        return result
