"""CRM sync: a journey's ``crm`` step reaches HubSpot (or a signed webhook) once, with
retries, on the time-skipping server, against local HTTP servers playing the CRM."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from sqlmodel import select
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment

from activities.crm import CrmActivities, SyncCrmTaskInput, crm_sync_workflow_id
from models.db import session_scope
from models.tables import Contact, CrmTask
from settings import Settings
from tests.helpers import contact, enroll
from tests.test_journey_language import journey
from tests.test_journey_workflow import result_of
from worker import build_worker
from workflows.crm_sync import CrmSyncResult, CrmSyncWorkflow

UPSERT = "/crm/v3/objects/contacts/batch/upsert"
TASKS = "/crm/v3/objects/tasks"
STAMP = "2026-01-05T10:00:00.000Z"


class FakeCrm:
    """A local server playing HubSpot's CRM v3 (or a webhook CRM on any other path).

    ``fail`` maps a path to statuses answered (with an error body) before it works.
    """

    def __init__(self, fail: dict[str, list[int]] | None = None) -> None:
        self.fail = fail or {}
        self.calls: list[dict[str, Any]] = []
        self.created_tasks: list[str] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self) -> None:
                raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                path = self.path.split("?", 1)[0]
                fake.calls.append(
                    {
                        "method": self.command,
                        "path": path,
                        "headers": dict(self.headers),
                        "raw": raw,
                        "body": json.loads(raw) if raw else None,
                    }
                )
                queued = fake.fail.get(path) or []
                if queued:
                    code, answer = queued.pop(0), {"status": "error", "message": "try later"}
                else:
                    code, answer = fake.respond(path, json.loads(raw) if raw else {})
                data = json.dumps(answer).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_POST = do_PATCH = _answer

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def respond(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if path == UPSERT:
            [item] = body["inputs"]
            return 200, {
                "status": "COMPLETE",
                "results": [
                    {
                        "id": "9001",
                        "properties": item["properties"],
                        "createdAt": STAMP,
                        "updatedAt": STAMP,
                        "archived": False,
                        "new": True,
                    }
                ],
                "startedAt": STAMP,
                "completedAt": STAMP,
            }
        if path == TASKS:
            task_id = str(7000 + len(self.created_tasks))
            self.created_tasks.append(task_id)
            return 201, {
                "id": task_id,
                "properties": body["properties"],
                "createdAt": STAMP,
                "updatedAt": STAMP,
                "archived": False,
            }
        return 200, {"id": "wh-task-1", "contact_id": "wh-contact-1"}

    def on(self, path: str) -> list[dict[str, Any]]:
        return [c for c in self.calls if c["path"] == path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def crm() -> Iterator[FakeCrm]:
    fake = FakeCrm()
    yield fake
    fake.close()


def through_hubspot(settings: Settings, fake: FakeCrm) -> Settings:
    return settings.model_copy(
        update={"crm_adapter": "hubspot", "hubspot_base_url": fake.url, "hubspot_token": "pat-1"}
    )


HANDOFF = {
    "id": "handoff",
    "type": "crm",
    "action": "create_task",
    "note": "Warm lead: call within 24h\nRead the pricing page twice.",
    "due_in": "1d",
    "owner": "sales@example.com",
    "properties": {"priority": "high"},
}


async def sync_result_of(env: WorkflowEnvironment, workflow_id: str) -> CrmSyncResult:
    """The sync workflow's result, skipping time through its retries (as ``result_of``)."""
    client = env.client
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    handle = client.get_workflow_handle_for(CrmSyncWorkflow.run, workflow_id, run_id=run_id)
    await client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
    try:
        async with asyncio.timeout(90):
            return await handle.result()
    finally:
        await client.test_service.lock_time_skipping(LockTimeSkippingRequest())


async def run_handoff(
    time_env: WorkflowEnvironment, api: httpx.AsyncClient, settings: Settings
) -> tuple[dict[str, Any], CrmTask, CrmSyncResult]:
    """Run a qualify + hand-off journey; wait for the task's sync to end."""
    key = await journey(
        api, [{"id": "qualify", "type": "update_contact", "lifecycle_stage": "mql"}, HANDOFF]
    )
    person = await contact(
        api, phone="+14155550100", attributes={"first_name": "Ada", "last_name": "Lovelace"}
    )
    async with build_worker(time_env.client, settings):
        enrolled = (await enroll(api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        async with session_scope(settings.database_url) as session:
            [task] = (
                await session.exec(
                    select(CrmTask).where(CrmTask.contact_id == uuid.UUID(person["id"]))
                )
            ).all()
        outcome = await sync_result_of(time_env, crm_sync_workflow_id(str(task.id)))
    async with session_scope(settings.database_url) as session:
        stored = await session.get(CrmTask, task.id)
    assert stored is not None
    return person, stored, outcome


async def test_crm_step_syncs_contact_and_task_to_hubspot_once(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    crm: FakeCrm,
) -> None:
    hubspot = through_hubspot(settings, crm)
    person, task, outcome = await run_handoff(time_env, time_api, hubspot)

    assert outcome.synced and outcome.external_id == "7000"
    assert task.external_id == "7000" and task.synced_at is not None
    assert task.sync_attempts == 1 and task.sync_error is None
    [upsert] = crm.on(UPSERT)
    [create] = crm.on(TASKS)
    assert len(crm.calls) == 2
    assert upsert["headers"]["Authorization"] == "Bearer pat-1"
    assert upsert["body"] == {
        "inputs": [
            {
                "idProperty": "email",
                "id": person["email"],
                "properties": {
                    "email": person["email"],
                    "firstname": "Ada",
                    "lastname": "Lovelace",
                    "phone": "+14155550100",
                    "lifecyclestage": "marketingqualifiedlead",
                },
            }
        ]
    }
    properties = create["body"]["properties"]
    assert properties["hs_task_subject"] == "Warm lead: call within 24h"
    assert properties["hs_task_body"].startswith("Warm lead: call within 24h\nRead the pricing")
    assert "Owner: sales@example.com" in properties["hs_task_body"]
    assert properties["hs_task_status"] == "NOT_STARTED"
    assert properties["hs_task_priority"] == "HIGH"
    assert task.due_at is not None
    assert properties["hs_timestamp"] == task.due_at.isoformat().replace("+00:00", "Z")
    assert all(isinstance(v, str) for v in properties.values())
    assert create["body"]["associations"] == [
        {
            "to": {"id": "9001"},
            "types": [{"associationCategory": "HUBSPOT_DEFINED", "associationTypeId": 204}],
        }
    ]
    async with session_scope(settings.database_url) as session:
        stored_contact = await session.get(Contact, uuid.UUID(person["id"]))
    assert stored_contact is not None and stored_contact.crm_id == "9001"

    again = await ActivityEnvironment().run(
        CrmActivities(hubspot).sync_crm_task, SyncCrmTaskInput(str(task.id))
    )
    assert again.status == "already synced" and again.external_id == "7000"
    assert len(crm.calls) == 2


async def test_hubspot_errors_are_retried_without_a_duplicate_task(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
) -> None:
    flaky = FakeCrm(fail={TASKS: [500, 503], UPSERT: [429]})
    try:
        _, task, outcome = await run_handoff(time_env, time_api, through_hubspot(settings, flaky))
    finally:
        flaky.close()
    assert outcome.synced
    assert flaky.created_tasks == ["7000"] and task.external_id == "7000"
    assert len(flaky.on(TASKS)) == 3
    assert task.sync_attempts == 4 and task.sync_error is None


async def test_hubspot_refusing_the_token_is_recorded_and_not_retried(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
) -> None:
    refusing = FakeCrm(fail={UPSERT: [401] * 5})
    try:
        _, task, outcome = await run_handoff(
            time_env, time_api, through_hubspot(settings, refusing)
        )
    finally:
        refusing.close()
    assert not outcome.synced and outcome.status == "failed"
    assert len(refusing.calls) == 1 and refusing.created_tasks == []
    assert task.sync_attempts == 1 and task.synced_at is None and task.external_id is None
    assert task.sync_error is not None and "NURTURE_HUBSPOT_TOKEN" in task.sync_error
    assert "HTTP 401" in task.sync_error


async def test_webhook_crm_adapter_posts_a_signed_task(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    crm: FakeCrm,
) -> None:
    through = settings.model_copy(
        update={
            "crm_adapter": "webhook",
            "crm_webhook_url": f"{crm.url}/crm/hook",
            "crm_webhook_secret": "crm-s3cret",
            "webhook_secret": "other",
        }
    )
    person, task, outcome = await run_handoff(time_env, time_api, through)

    assert outcome.synced and task.external_id == "wh-task-1" and task.synced_at is not None
    [call] = crm.calls
    assert call["path"] == "/crm/hook"
    assert call["headers"]["X-Nurture-Idempotency-Key"] == task.idempotency_key
    stamp, signature = (
        part.split("=", 1)[1] for part in call["headers"]["X-Nurture-Signature"].split(",")
    )
    expected = hmac.new(
        b"crm-s3cret", f"{stamp}.".encode() + call["raw"], hashlib.sha256
    ).hexdigest()
    assert hmac.compare_digest(signature, expected)
    body = call["body"]
    assert body["type"] == "task" and body["idempotency_key"] == task.idempotency_key
    assert body["contact"]["id"] == person["id"] and body["contact"]["email"] == person["email"]
    assert body["contact"]["lifecycle_stage"] == "mql"
    assert body["contact"]["attributes"]["first_name"] == "Ada"
    assert body["task"]["note"] == HANDOFF["note"] and body["task"]["owner"] == "sales@example.com"
    assert body["task"]["properties"] == {"priority": "high"} and body["task"]["due_at"]
    async with session_scope(settings.database_url) as session:
        stored_contact = await session.get(Contact, uuid.UUID(person["id"]))
    assert stored_contact is not None and stored_contact.crm_id == "wh-contact-1"


async def test_crm_webhook_refuses_a_private_url_without_retrying(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    crm: FakeCrm,
) -> None:
    through = settings.model_copy(
        update={
            "crm_adapter": "webhook",
            "crm_webhook_url": f"{crm.url}/crm/hook",
            "outbound_allow_private": "",
        }
    )
    _, task, outcome = await run_handoff(time_env, time_api, through)
    assert not outcome.synced and crm.calls == []
    assert task.sync_attempts == 1
    assert task.sync_error is not None and "127.0.0.1 is loopback" in task.sync_error
