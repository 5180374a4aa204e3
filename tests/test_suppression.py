"""Suppression is checked by the send activity itself, at send time, not only at enrollment."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy.dialects.postgresql import insert
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.db import session_scope
from models.tables import Contact, SubscriptionStatus, Suppression
from settings import Settings
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_journey_language import journey, outcome, state
from tests.test_journey_workflow import messages_of, result_of


async def change_contact(settings: Settings, contact_id: str, **fields: Any) -> None:
    async with session_scope(settings.database_url) as session:
        stored = await session.get(Contact, uuid.UUID(contact_id))
        assert stored is not None
        for name, value in fields.items():
            setattr(stored, name, value)
        session.add(stored)


async def suppress(settings: Settings, channel: str, address: str, reason: str) -> None:
    async with session_scope(settings.database_url) as session:
        await session.exec(
            insert(Suppression)
            .values(id=uuid.uuid4(), channel=channel, address=address, reason=reason)
            .on_conflict_do_nothing()
        )


@pytest.mark.parametrize(
    ("channel", "how", "reason"),
    [
        ("email", {"email_status": SubscriptionStatus.unsubscribed}, "email unsubscribed"),
        ("email", {"email_status": SubscriptionStatus.bounced}, "email bounced"),
        ("email", {"email_status": SubscriptionStatus.complained}, "email complained"),
        ("email", "suppression", "address suppressed (bounced)"),
        ("sms", {"sms_status": SubscriptionStatus.unsubscribed}, "sms unsubscribed"),
        ("sms", "suppression", "address suppressed (sms_opt_out)"),
    ],
)
async def test_send_checks_suppression_at_send_time_and_the_journey_goes_on(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    channel: str,
    how: Any,
    reason: str,
) -> None:
    template = unique("t")
    key = await journey(
        time_api,
        [
            {"id": "ready", "type": "wait_for", "event": "go"},
            {"id": "send", "type": channel, "template": template},
            {"id": "after", "type": "update_contact", "add_tags": ["reached-the-end"]},
        ],
    )
    person = await contact(time_api, phone="+14155550142")
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    # Subscribed at enrollment; suppressed only afterwards, while the journey waits.
    await wait_for_step(time_api, enrolled["id"], "ready")
    if how == "suppression":
        address = person["email"] if channel == "email" else "+14155550142"
        await suppress(
            settings, channel, address, "bounced" if channel == "email" else "sms_opt_out"
        )
    else:
        await change_contact(settings, person["id"], **how)
    await time_api.post(
        "/v1/events", json={"id": unique("go"), "contact_id": person["id"], "name": "go"}
    )
    await result_of(time_env, enrolled["workflow_id"])

    [message] = await messages_of(settings, enrolled["id"])
    assert (message.status, message.skip_reason) == ("skipped", reason)
    assert message.sent_at is None and message.provider_message_id is None
    folder = settings.outbox_path / channel
    assert not folder.exists() or not any(folder.iterdir())
    view = await state(time_api, enrolled["id"])
    assert outcome(view, "send") == f"{channel} skipped: {reason}"
    assert (await time_api.get(f"/v1/contacts/{person['id']}")).json()["tags"] == [
        "reached-the-end"
    ]
