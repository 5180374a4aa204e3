"""JourneyWorkflow on Temporal's time-skipping server, with real activities and PostgreSQL."""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

import httpx
from sqlmodel import select
from temporalio import activity
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.messaging import MessagingActivities
from models.contracts import JourneyResult, SendEmailInput, SendEmailResult
from models.db import session_scope
from models.tables import Message
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step
from worker import WORKFLOWS, build_activities
from workflows.journey import JourneyWorkflow


async def messages_of(settings: Settings, enrollment_id: str) -> list[Message]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Message).where(Message.enrollment_id == uuid.UUID(enrollment_id))
        )
        return list(rows.all())


async def result_of(env: WorkflowEnvironment, workflow_id: str) -> JourneyResult:
    """The journey's result, skipping time while it runs.

    The API started the workflow, so the handle is not the test environment's own and
    time skipping must be unlocked here; the server also needs the run id to follow it.
    """
    client = env.client
    run_id = (await client.get_workflow_handle(workflow_id).describe()).run_id
    handle = client.get_workflow_handle_for(JourneyWorkflow.run, workflow_id, run_id=run_id)
    await client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
    try:
        # A journey stuck retrying an activity would otherwise spin forever in skipped time.
        async with asyncio.timeout(90):
            return await handle.result()
    finally:
        await client.test_service.lock_time_skipping(LockTimeSkippingRequest())


def outbox_files(settings: Settings) -> list[str]:
    folder = settings.outbox_path / "email"
    return sorted(p.name for p in folder.glob("*.eml")) if folder.exists() else []


async def test_wait_of_three_weeks_completes_in_seconds(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    template = unique("tpl")
    await put_template(time_api, template, subject="Three weeks later, {{ contact.first_name }}")
    key = unique("three-weeks")
    await publish(time_api, {"key": key, "name": "Slow nurture", "steps": [
        {"id": "pause", "type": "wait", "duration": "3w"},
        {"id": "nudge", "type": "email", "template": template},
    ]})  # fmt: skip
    person = await contact(time_api, attributes={"first_name": "Ada"})
    started = await time_env.get_current_time()
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]

    result = await result_of(time_env, enrolled["workflow_id"])

    assert result.status == "completed"
    assert await time_env.get_current_time() - started >= timedelta(weeks=3)
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent" and message.subject == "Three weeks later, Ada"
    assert outbox_files(settings) == [f"{message.id}.eml"]
    state = (await time_api.get(f"/v1/enrollments/{enrolled['id']}")).json()
    assert state["status"] == "completed"
    assert [h["step_id"] for h in state["history"]] == ["pause", "nudge"]


async def _wait_for_journey(api: httpx.AsyncClient) -> str:
    for name in ("offer", "opened-track", "cold-track"):
        await put_template(api, f"{name}-{api.headers['x-test']}")
    suffix = api.headers["x-test"]
    key = unique("open-or-not")
    await publish(api, {"key": key, "name": "Open or not", "steps": [
        {"id": "offer", "type": "email", "template": f"offer-{suffix}"},
        {"id": "opened", "type": "wait_for", "event": "email_opened", "timeout": "3d",
         "where": {"prop": "campaign", "op": "eq", "value": "trial"},
         "on_event": "warm", "on_timeout": "cold"},
        {"id": "warm", "type": "email", "template": f"opened-track-{suffix}"},
        {"id": "warm-done", "type": "exit"},
        {"id": "cold", "type": "email", "template": f"cold-track-{suffix}"},
    ]})  # fmt: skip
    return key


async def test_wait_for_takes_event_branch_when_the_event_arrives(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    time_api.headers["x-test"] = uuid.uuid4().hex[:6]
    key = await _wait_for_journey(time_api)
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "opened")

    # An open of another campaign does not match the step's `where`; the trial one does.
    for event_id, campaign in (("e-other", "webinar"), ("e-trial", "trial")):
        response = await time_api.post("/v1/events", json={
            "id": f"{event_id}-{enrolled['id']}", "contact_id": person["id"],
            "name": "email_opened", "properties": {"campaign": campaign},
        })  # fmt: skip
        assert response.status_code == 202, response.text
        assert response.json()["delivered_to"] == 1

    result = await result_of(time_env, enrolled["workflow_id"])
    assert result.status == "exited"
    sent = await messages_of(settings, enrolled["id"])
    assert sorted(m.step_id or "" for m in sent) == ["offer", "warm"]
    state = (await time_api.get(f"/v1/enrollments/{enrolled['id']}")).json()
    opened = next(h for h in state["history"] if h["step_id"] == "opened")
    assert opened["outcome"].startswith("event email_opened")


async def test_wait_for_takes_timeout_branch_when_no_event_comes(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    time_api.headers["x-test"] = uuid.uuid4().hex[:6]
    key = await _wait_for_journey(time_api)
    person = await contact(time_api)
    started = await time_env.get_current_time()
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]

    result = await result_of(time_env, enrolled["workflow_id"])

    assert result.status == "completed"
    assert await time_env.get_current_time() - started >= timedelta(days=3)
    sent = await messages_of(settings, enrolled["id"])
    assert sorted(m.step_id or "" for m in sent) == ["cold", "offer"]


async def test_branch_follows_the_contact_attribute(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    exec_tpl, other_tpl = unique("exec"), unique("other")
    await put_template(time_api, exec_tpl)
    await put_template(time_api, other_tpl)
    key = unique("persona")
    await publish(time_api, {"key": key, "name": "Persona", "steps": [
        {"id": "persona", "type": "branch",
         "cases": [{"if": {"attr": "role", "op": "in", "value": ["CMO", "VP Marketing"]},
                    "goto": "exec"}],
         "else": "other"},
        {"id": "exec", "type": "email", "template": exec_tpl},
        {"id": "stop", "type": "exit"},
        {"id": "other", "type": "email", "template": other_tpl},
    ]})  # fmt: skip
    cmo = await contact(time_api, attributes={"role": "CMO"})
    engineer = await contact(time_api, attributes={"role": "Engineer"})
    nobody = await contact(time_api)

    templates = {}
    for person in (cmo, engineer, nobody):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        [message] = await messages_of(settings, enrolled["id"])
        templates[person["id"]] = message.template_key

    assert templates == {cmo["id"]: exec_tpl, engineer["id"]: other_tpl, nobody["id"]: other_tpl}


async def test_enrolling_twice_yields_one_workflow(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    key = unique("twice")
    await publish(time_api, {"key": key, "name": "Twice", "steps": [
        {"id": "pause", "type": "wait", "duration": "1d"},
    ]})  # fmt: skip
    person = await contact(time_api)

    first = await enroll(time_api, key, person["id"])
    workflow_id = first["enrollment"]["workflow_id"]
    first_run = (await time_env.client.get_workflow_handle(workflow_id).describe()).run_id
    second = await enroll(time_api, key, person["id"])

    assert first["created"] is True and second["created"] is False
    assert first["enrollment"]["id"] == second["enrollment"]["id"]
    assert (await time_env.client.get_workflow_handle(workflow_id).describe()).run_id == first_run
    await result_of(time_env, workflow_id)
    again = await enroll(time_api, key, person["id"])
    assert again["created"] is False and again["enrollment"]["status"] == "completed"
    assert (await time_env.client.get_workflow_handle(workflow_id).describe()).run_id == first_run


async def test_retried_send_produces_one_message(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    """The send succeeds at the provider, then the activity dies; the retry sends nothing."""
    real = MessagingActivities(settings)
    attempts: list[int] = []

    @activity.defn(name="send_email")
    async def send_email_then_crash(input: SendEmailInput) -> SendEmailResult:
        attempts.append(activity.info().attempt)
        result = await real.send_email(input)
        if activity.info().attempt == 1:
            raise RuntimeError("worker lost after the provider accepted the message")
        return result

    activities: list[Any] = [
        a for a in build_activities(settings) if getattr(a, "__name__", "") != "send_email"
    ]
    template = unique("retry")
    await put_template(time_api, template)
    key = unique("retry")
    await publish(time_api, {"key": key, "name": "Retry", "steps": [
        {"id": "hello", "type": "email", "template": template},
    ]})  # fmt: skip
    person = await contact(time_api)
    async with Worker(
        time_env.client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=[*activities, send_email_then_crash],
    ):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        result = await result_of(time_env, enrolled["workflow_id"])

    assert result.status == "completed"
    assert attempts == [1, 2]
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent"
    assert outbox_files(settings) == [f"{message.id}.eml"]
