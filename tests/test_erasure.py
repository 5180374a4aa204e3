"""Erasing a contact: no trace of its personal data in any table, the outbox or its journeys."""

from __future__ import annotations

import asyncio
import uuid

import httpx
from sqlalchemy import text
from sqlmodel import select
from temporalio.client import WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.db import session_scope
from models.tables import Message, MessageChannel, Suppression, SuppressionReason, hashed_address
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step


async def rows_mentioning(settings: Settings, needle: str) -> dict[str, int]:
    """How many rows of each public table hold ``needle`` anywhere (case-insensitive)."""
    found: dict[str, int] = {}
    async with session_scope(settings.database_url) as session:
        tables = (
            await session.exec(  # type: ignore[call-overload]
                text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            )
        ).all()
        for (table,) in tables:
            hits = (
                await session.exec(  # type: ignore[call-overload]
                    text(
                        f'SELECT count(*) FROM "{table}" t WHERE row_to_json(t)::text ILIKE :p'
                    ).bindparams(p=f"%{needle}%")
                )
            ).one()[0]
            if hits:
                found[table] = hits
    return found


def outbox_mentioning(settings: Settings, needle: str) -> list[str]:
    return [
        str(path)
        for path in settings.outbox_path.rglob("*")
        if path.is_file() and needle.lower() in path.read_bytes().decode(errors="replace").lower()
    ]


async def test_erase_removes_personal_data_everywhere(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    template = unique("tpl")
    await put_template(time_api, template, subject="Hello {{ contact.first_name }}")
    key = unique("erase")
    await publish(time_api, {"key": key, "name": "Erase me", "steps": [
        {"id": "hello", "type": "email", "template": template},
        {"id": "pause", "type": "wait", "duration": "2d"},
    ]})  # fmt: skip
    external_id = unique("crm-erase")
    person = await contact(
        time_api,
        phone=f"+447700{uuid.uuid4().int % 10**6:06d}",  # unlike any other test's number
        external_id=external_id,
        attributes={"first_name": "Grace"},
    )
    email, phone = person["email"], person["phone"]
    event = await time_api.post("/v1/events", json={
        "contact_id": person["id"], "name": "form_filled",
        "properties": {"email": email, "phone": phone},
    })  # fmt: skip
    assert event.status_code in (200, 201, 202), event.text
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "pause")
    async with session_scope(settings.database_url) as session:
        [message] = (
            await session.exec(
                select(Message).where(Message.enrollment_id == uuid.UUID(enrolled["id"]))
            )
        ).all()
        assert message.status == "sent"
        session.add(
            Suppression(
                channel=MessageChannel.email, address=email, reason=SuppressionReason.manual
            )
        )
    assert outbox_mentioning(settings, email)
    assert set(await rows_mentioning(settings, email)) >= {"contacts", "events", "messages"}

    response = await time_api.delete(f"/v1/contacts/{person['id']}")

    assert response.status_code == 200, response.text
    assert response.json() == {
        "erased": True, "journeys_ended": 1, "events_anonymised": 1,
        "messages_scrubbed": 1, "outbox_files_removed": 1,
    }  # fmt: skip
    for needle in (email, phone, external_id, "Grace"):
        assert await rows_mentioning(settings, needle) == {}, needle
        assert outbox_mentioning(settings, needle) == [], needle
    assert (await time_api.get(f"/v1/contacts/{person['id']}")).status_code == 404
    state = (await time_api.get(f"/v1/enrollments/{enrolled['id']}")).json()
    assert state["status"] == "exited" and state["exit_reason"] == "contact erased"
    try:
        described = await time_env.client.get_workflow_handle(enrolled["workflow_id"]).describe()
        assert described.status == WorkflowExecutionStatus.TERMINATED
    except RPCError as err:  # the history was deleted
        assert err.status == RPCStatusCode.NOT_FOUND
    async with session_scope(settings.database_url) as session:
        kept = (await session.exec(select(Suppression).where(Suppression.channel == "email"))).all()
        assert hashed_address(email) in {s.address for s in kept}

    again = await time_api.delete(f"/v1/contacts/{person['id']}")
    assert again.status_code == 200
    assert again.json() == {
        "erased": True, "journeys_ended": 0, "events_anonymised": 0,
        "messages_scrubbed": 0, "outbox_files_removed": 0,
    }  # fmt: skip

    # The address comes back (a re-import): its suppression still holds.
    returned = await time_api.post("/v1/contacts/import", json=[{"email": email}])
    assert returned.json()["created"] == 1, returned.text
    newcomer = (await time_api.get("/v1/contacts", params={"email": email})).json()["contacts"]
    second = (await enroll(time_api, key, newcomer[0]["id"]))["enrollment"]
    await wait_for_step(time_api, second["id"], "pause")
    async with session_scope(settings.database_url) as session:
        [skipped] = (
            await session.exec(
                select(Message).where(Message.enrollment_id == uuid.UUID(second["id"]))
            )
        ).all()
    assert skipped.status == "skipped" and skipped.skip_reason == "address suppressed (manual)"


async def test_erase_unknown_contact_is_404(time_api: httpx.AsyncClient) -> None:
    missing = uuid.uuid4()
    for response in (
        await time_api.delete(f"/v1/contacts/{missing}"),
        await time_api.post(f"/v1/contacts/{missing}/erase"),
    ):
        assert response.status_code == 404
        assert response.json()["detail"] == f"no contact with id {missing}"


async def test_erase_by_post_without_journeys(time_api: httpx.AsyncClient) -> None:
    person = await contact(time_api)
    response = await time_api.post(f"/v1/contacts/{person['id']}/erase")
    assert response.status_code == 200 and response.json()["journeys_ended"] == 0
    listed = await time_api.get("/v1/contacts", params={"email": person["email"]})
    assert listed.json()["contacts"] == []


async def test_erase_deletes_the_journey_history_on_a_real_server(
    dev_env: WorkflowEnvironment,
    dev_api: httpx.AsyncClient,
    dev_worker: Worker,
) -> None:
    template = unique("tpl")
    await put_template(dev_api, template)
    key = unique("erase-dev")
    await publish(dev_api, {"key": key, "name": "Erase on dev", "steps": [
        {"id": "hello", "type": "email", "template": template},
        {"id": "pause", "type": "wait", "duration": "30d"},
    ]})  # fmt: skip
    person = await contact(dev_api)
    enrolled = (await enroll(dev_api, key, person["id"]))["enrollment"]
    await wait_for_step(dev_api, enrolled["id"], "pause")

    response = await dev_api.delete(f"/v1/contacts/{person['id']}")

    assert response.status_code == 200 and response.json()["journeys_ended"] == 1
    handle = dev_env.client.get_workflow_handle(enrolled["workflow_id"])
    # Deletion is asynchronous: the run is terminated at once, its history goes within ~30 s.
    deadline = asyncio.get_running_loop().time() + 60
    while True:
        try:
            described = await handle.describe()
        except RPCError as err:
            assert err.status == RPCStatusCode.NOT_FOUND
            break
        assert described.status == WorkflowExecutionStatus.TERMINATED
        assert asyncio.get_running_loop().time() < deadline, "history never deleted"
        await asyncio.sleep(0.2)
