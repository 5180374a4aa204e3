"""channel: best on email and SMS steps: synthetic engagement with known answers, on the
time-skipping server with real activities, PostgreSQL and the outbox providers."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlmodel import update
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.db import session_scope
from models.tables import Contact, SubscriptionStatus
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique
from tests.test_journey_language import state
from tests.test_journey_workflow import messages_of, result_of


async def templates(api: httpx.AsyncClient) -> tuple[str, str]:
    email, sms = unique("mail"), unique("text")
    await put_template(api, email)
    await put_template(api, sms, channel="sms", text="Hi", subject=None, html=None)
    return email, sms


async def events(
    api: httpx.AsyncClient, person: dict[str, Any], names: dict[str, int], now: Any
) -> None:
    for name, count in names.items():
        for n in range(count):
            response = await api.post(
                "/v1/events",
                json={
                    "id": f"{person['id']}-{name}-{n}",
                    "contact_id": person["id"],
                    "name": name,
                    "occurred_at": (now - timedelta(days=3 + n)).isoformat(),
                },
            )
            assert response.status_code == 202, response.text


@pytest.mark.parametrize(
    ("history", "unsubscribe", "channel", "reason"),
    [
        (
            {"sms_received": 3, "email_opened": 1},
            None,
            "sms",
            "more engagement there (1 email opens/clicks, 3 sms replies/clicks in 90 days)",
        ),
        (
            {"email_opened": 1, "email_clicked": 1, "sms_received": 1},
            None,
            "email",
            "more engagement there (2 email opens/clicks, 1 sms replies/clicks in 90 days)",
        ),
        (
            {"email_opened": 5},
            "email",
            "sms",
            "the only channel the contact can receive (email unsubscribed)",
        ),
        (
            {},
            None,
            "email",
            "the step's own channel: a tie (0 email opens/clicks, 0 sms replies/clicks in 90 days)",
        ),
    ],
    ids=["replies-win", "opens-win", "email-unsubscribed", "no-history"],
)
async def test_email_step_with_channel_best_picks_the_engaged_channel(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    history: dict[str, int],
    unsubscribe: str | None,
    channel: str,
    reason: str,
) -> None:
    email, sms = await templates(time_api)
    key = unique("best-channel")
    await publish(time_api, {"key": key, "name": "Best channel", "steps": [
        {"id": "hello", "type": "email", "template": email, "subject": "Hello",
         "channel": "best", "sms_template": sms},
    ]})  # fmt: skip
    person = await contact(time_api, phone="+14155550123")
    await events(time_api, person, history, await time_env.get_current_time())
    if unsubscribe:
        async with session_scope(settings.database_url) as session:
            await session.exec(
                update(Contact)
                .where(Contact.id == uuid.UUID(person["id"]))  # type: ignore[arg-type]
                .values(email_status=SubscriptionStatus.unsubscribed)
            )

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])

    [message] = await messages_of(settings, enrolled["id"])
    assert message.channel == channel and message.status == "sent"
    assert message.template_key == (email if channel == "email" else sms)
    assert message.subject == ("Hello" if channel == "email" else None)
    view = await state(time_api, enrolled["id"])
    assert view["choices"]["hello"]["kind"] == "channel"
    assert view["choices"]["hello"]["choice"] == channel
    assert view["choices"]["hello"]["reason"] == reason
    assert view["history"][0]["outcome"] == f"{channel} sent"


async def test_sms_step_with_channel_best_emails_a_contact_without_phone(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    email, sms = await templates(time_api)
    key = unique("best-channel")
    await publish(time_api, {"key": key, "name": "Best channel", "steps": [
        {"id": "text", "type": "sms", "template": sms, "channel": "best",
         "email_template": email},
    ]})  # fmt: skip
    person = await contact(time_api)

    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])

    [message] = await messages_of(settings, enrolled["id"])
    assert (message.channel, message.template_key, message.status) == ("email", email, "sent")
    view = await state(time_api, enrolled["id"])
    assert view["choices"]["text"]["reason"] == (
        "the only channel the contact can receive (no phone)"
    )


@pytest.mark.parametrize(
    ("step", "field", "message"),
    [
        (
            {"channel": "best"},
            "",
            "channel: best needs sms_template (the template for the other channel)",
        ),
        ({"sms_template": "TEMPLATE_SMS"}, "", "sms_template is only used with channel: best"),
        ({"channel": "email"}, "channel", "Input should be 'best'"),
        (
            {"channel": "best", "sms_template": "TEMPLATE_EMAIL"},
            "sms_template",
            "is for email, not sms",
        ),
        ({"channel": "best", "sms_template": "no-such-template"}, "sms_template", "no template"),
    ],
)
async def test_channel_best_is_validated_at_publish_naming_the_step(
    time_api: httpx.AsyncClient, step: dict[str, Any], field: str, message: str
) -> None:
    email, sms = await templates(time_api)
    swap = {"TEMPLATE_SMS": sms, "TEMPLATE_EMAIL": email}
    extra = {k: swap.get(v, v) for k, v in step.items()}
    key = unique("bad-channel")
    document = {"key": key, "name": "Bad", "steps": [
        {"id": "hello", "type": "email", "template": email, **extra},
    ]}  # fmt: skip
    created = await time_api.post("/v1/journeys", json=document)
    if created.status_code == 422:
        [problem] = created.json()["detail"]["errors"]
        assert (await time_api.get(f"/v1/journeys/{key}")).status_code == 404
    else:
        assert created.status_code == 201, created.text
        published = await time_api.post(f"/v1/journeys/{key}/publish")
        assert published.status_code == 422, published.text
        [problem] = published.json()["detail"]["errors"]
        assert (await time_api.get(f"/v1/journeys/{key}")).json()["current_version"] is None
    assert problem["step"] == "hello"
    assert (problem["field"] or "") == field
    assert message in problem["message"]
