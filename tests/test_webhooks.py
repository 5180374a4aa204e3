"""Provider webhooks: SendGrid's signed Event Webhook and Twilio's signed callbacks, on real
PostgreSQL and the time-skipping Temporal server, signed with the providers' own schemes."""

from __future__ import annotations

import base64
import copy
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from sqlmodel import col, func, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from twilio.request_validator import RequestValidator

from api.main import create_app
from models.db import session_scope
from models.tables import Contact, Event, Message, MessageChannel, MessageStatus, Suppression
from settings import Settings
from tests.conftest import terminate_active_runs
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_journey_language import journey, state
from tests.test_journey_workflow import messages_of, result_of

# SendGrid's documented Event Webhook payloads (a copy of shared/reference/sendgrid-events.json).
REFERENCE = json.loads(
    (Path(__file__).resolve().parent / "fixtures" / "sendgrid-events.json").read_text()
)
TWILIO_TOKEN = "twilio-test-auth-token"
PRIVATE_KEY = ec.generate_private_key(ec.SECP256R1())
PUBLIC_KEY = base64.b64encode(
    PRIVATE_KEY.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
).decode()


@pytest.fixture
def hook_settings(settings: Settings) -> Settings:
    # model_copy sets twilio_auth_token even before settings.py declares it.
    return settings.model_copy(
        update={"sendgrid_webhook_public_key": PUBLIC_KEY, "twilio_auth_token": TWILIO_TOKEN}
    )


@pytest.fixture
async def clients(
    time_env: WorkflowEnvironment, hook_settings: Settings
) -> AsyncIterator[tuple[httpx.AsyncClient, httpx.AsyncClient]]:
    """The API with its key (to set up journeys) and, on the same app, a webhook caller
    that has no key: providers authenticate by signature only."""
    app = create_app(hook_settings, temporal=time_env.client)
    transport = httpx.ASGITransport(app=app)
    base = "http://nurture.test"
    auth = {"Authorization": f"Bearer {hook_settings.api_key}"}
    async with (
        httpx.AsyncClient(transport=transport, base_url=base, headers=auth) as api,
        httpx.AsyncClient(transport=transport, base_url=base) as hooks,
    ):
        yield api, hooks
    await terminate_active_runs(time_env.client, hook_settings)


@pytest.fixture
def api(clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> httpx.AsyncClient:
    return clients[0]


@pytest.fixture
def hooks(clients: tuple[httpx.AsyncClient, httpx.AsyncClient]) -> httpx.AsyncClient:
    return clients[1]


def sendgrid_event(kind: str, message_id: Any = None, **fields: Any) -> dict[str, Any]:
    """The documented example payload of ``kind``, with a fresh sg_event_id."""
    [example] = [e for e in REFERENCE["all_event_types"] if e["event"] == kind]
    event = copy.deepcopy(example)
    event["sg_event_id"] = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode()
    if message_id is not None:
        event["nurture_message_id"] = str(message_id)
    return {**event, **fields}


def sign_sendgrid(body: bytes, timestamp: str | None = None) -> dict[str, str]:
    timestamp = timestamp or str(int(time.time()))
    signature = PRIVATE_KEY.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
    return {
        "X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
        "X-Twilio-Email-Event-Webhook-Timestamp": timestamp,
        "Content-Type": "application/json",
    }


async def post_sendgrid(hooks: httpx.AsyncClient, events: list[dict[str, Any]]) -> httpx.Response:
    body = json.dumps(events).encode()
    return await hooks.post("/webhooks/sendgrid", content=body, headers=sign_sendgrid(body))


async def post_twilio(
    hooks: httpx.AsyncClient, path: str, params: dict[str, str], token: str = TWILIO_TOKEN
) -> httpx.Response:
    url = "http://127.0.0.1:8000" + path  # the default NURTURE_PUBLIC_URL
    signature = RequestValidator(token).compute_signature(url, params)
    return await hooks.post(
        path,
        content=urlencode(params),
        headers={
            "X-Twilio-Signature": signature,
            "Content-Type": "application/x-www-form-urlencoded",
        },
    )


async def sent_message(
    settings: Settings, contact_id: str, to: str, channel: str = "email", provider_id: Any = None
) -> Message:
    async with session_scope(settings.database_url) as session:
        message = Message(
            idempotency_key=unique("test-send"),
            contact_id=uuid.UUID(contact_id),
            channel=MessageChannel(channel),
            template_key="welcome",
            to_address=to,
            provider="sendgrid" if channel == "email" else "twilio",
            provider_message_id=provider_id,
            status=MessageStatus.sent,
        )
        session.add(message)
        await session.flush()
        await session.refresh(message)
        return message


async def message_row(settings: Settings, message_id: uuid.UUID) -> Message:
    async with session_scope(settings.database_url) as session:
        row = await session.get(Message, message_id)
        assert row is not None
        return row


async def events_with(settings: Settings, idempotency_ids: list[str]) -> list[Event]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Event).where(col(Event.idempotency_id).in_(idempotency_ids))
        )
        return list(rows.all())


async def test_sendgrid_batch_is_stored_once_and_posting_it_again_is_acknowledged(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    person = await contact(api)
    message = await sent_message(hook_settings, person["id"], person["email"])
    batch = [
        sendgrid_event(e["event"], message.id, email=person["email"])
        for e in REFERENCE["all_event_types"]
    ]
    first = await post_sendgrid(hooks, batch)
    again = await post_sendgrid(hooks, batch)
    assert first.status_code == 200 and again.status_code == 200, again.text
    assert first.json() == {"received": 11, "stored": 11}
    assert again.json() == {"received": 11, "stored": 0}

    stored = await events_with(hook_settings, [f"sendgrid:{e['sg_event_id']}" for e in batch])
    assert len(stored) == 11
    assert {e.name for e in stored} == {
        "email_processed",
        "email_deferred",
        "email_delivered",
        "email_opened",
        "email_clicked",
        "email_bounced",
        "email_dropped",
        "email_spam_reported",
        "email_unsubscribed",
        "email_group_unsubscribed",
        "email_group_resubscribed",
    }
    for event in stored:
        assert event.source == "sendgrid" and str(event.contact_id) == person["id"]
        assert event.properties["message_id"] == str(message.id)
        assert not {"email", "ip", "useragent", "smtp-id"} & set(event.properties)
    click = next(e for e in stored if e.name == "email_clicked")
    assert click.properties["url"] == "http://www.sendgrid.com/"


async def test_sendgrid_status_never_moves_backwards(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    person = await contact(api)
    message = await sent_message(hook_settings, person["id"], person["email"])
    assert (await post_sendgrid(hooks, [sendgrid_event("open", message.id)])).status_code == 200
    assert (
        await post_sendgrid(hooks, [sendgrid_event("delivered", message.id)])
    ).status_code == 200
    row = await message_row(hook_settings, message.id)
    assert row.status == "opened"
    assert row.opened_at is not None and row.delivered_at is not None
    opened_at = row.opened_at

    await post_sendgrid(hooks, [sendgrid_event("open", message.id, timestamp=1800000000)])
    await post_sendgrid(hooks, [sendgrid_event("bounce", message.id)])
    await post_sendgrid(hooks, [sendgrid_event("click", message.id)])
    row = await message_row(hook_settings, message.id)
    assert row.status == "bounced", "a late event does not undo a bounce"
    assert row.opened_at == opened_at, "the timestamp is set the first time only"
    assert row.bounced_at is not None and row.clicked_at is not None


async def test_sendgrid_bounce_suppresses_the_address_and_marks_the_contact(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    person = await contact(api)
    message = await sent_message(hook_settings, person["id"], person["email"])
    response = await post_sendgrid(hooks, [sendgrid_event("bounce", message.id)])
    assert response.status_code == 200, response.text
    complainer = await contact(api)
    # No (or an unknown) message id: the contact is found by the event's address.
    response = await post_sendgrid(
        hooks,
        [sendgrid_event("spamreport", uuid.uuid4(), email=complainer["email"].upper())],
    )
    assert response.status_code == 200, response.text
    async with session_scope(hook_settings.database_url) as session:
        suppressions = {
            s.address: s.reason
            for s in (
                await session.exec(
                    select(Suppression).where(
                        col(Suppression.address).in_([person["email"], complainer["email"]])
                    )
                )
            ).all()
        }
        bounced = await session.get(Contact, uuid.UUID(person["id"]))
        complained = await session.get(Contact, uuid.UUID(complainer["id"]))
        assert bounced is not None and complained is not None
        assert bounced.email_status == "bounced" and complained.email_status == "complained"
        spam = (await session.exec(select(Event).where(Event.contact_id == complained.id))).one()
        assert spam.name == "email_spam_reported"
    assert suppressions == {person["email"]: "bounced", complainer["email"]: "complained"}
    assert (await message_row(hook_settings, message.id)).status == "bounced"


async def test_sendgrid_bad_signature_is_refused_and_nothing_is_stored(
    hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    event = sendgrid_event("delivered", uuid.uuid4())
    body = json.dumps([event]).encode()
    tampered = body.replace(b"delivered", b"open")
    other_key = ec.generate_private_key(ec.SECP256R1())
    forged = base64.b64encode(other_key.sign(b"1700000000" + body, ec.ECDSA(hashes.SHA256())))
    attempts = [
        (tampered, sign_sendgrid(body)),
        (body, {**sign_sendgrid(body), "X-Twilio-Email-Event-Webhook-Timestamp": "1"}),
        (body, {**sign_sendgrid(body), "X-Twilio-Email-Event-Webhook-Signature": forged.decode()}),
        (body, {**sign_sendgrid(body), "X-Twilio-Email-Event-Webhook-Signature": "not base64!"}),
        (body, {"Content-Type": "application/json"}),
    ]
    for content, headers in attempts:
        response = await hooks.post("/webhooks/sendgrid", content=content, headers=headers)
        assert response.status_code == 403, response.text
    assert await events_with(hook_settings, [f"sendgrid:{event['sg_event_id']}"]) == []


async def test_sendgrid_replayed_request_is_refused(
    hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    """A captured, validly signed request sent again an hour later is refused."""
    event = sendgrid_event("delivered", uuid.uuid4())
    body = json.dumps([event]).encode()
    an_hour_ago = str(int(time.time()) - 3600)
    replayed = await hooks.post(
        "/webhooks/sendgrid", content=body, headers=sign_sendgrid(body, an_hour_ago)
    )
    assert replayed.status_code == 403 and "stale" in replayed.text
    assert await events_with(hook_settings, [f"sendgrid:{event['sg_event_id']}"]) == []
    fresh = await hooks.post("/webhooks/sendgrid", content=body, headers=sign_sendgrid(body))
    assert fresh.status_code == 200


async def test_sendgrid_without_a_configured_key_refuses_everything(
    time_env: WorkflowEnvironment, settings: Settings
) -> None:
    app = create_app(settings, temporal=time_env.client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture.test"
    ) as hooks:
        response = await post_sendgrid(hooks, [sendgrid_event("delivered")])
    assert response.status_code == 403


async def test_sendgrid_batch_over_1000_events_is_too_large(
    hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    batch = [sendgrid_event("processed") for _ in range(1001)]
    response = await post_sendgrid(hooks, batch)
    assert response.status_code == 413, response.text
    assert await events_with(hook_settings, [f"sendgrid:{batch[0]['sg_event_id']}"]) == []
    response = await post_sendgrid(hooks, batch[:1000])
    assert response.status_code == 200 and response.json()["stored"] == 1000


async def test_signed_open_takes_a_waiting_journey_down_its_event_branch(
    time_env: WorkflowEnvironment,
    api: httpx.AsyncClient,
    hooks: httpx.AsyncClient,
    time_worker: Worker,
    hook_settings: Settings,
) -> None:
    key = await journey(
        api,
        [
            {"id": "hello", "type": "email", "template": unique("hello")},
            {
                "id": "wait-open",
                "type": "wait_for",
                "event": "email_opened",
                "timeout": "3d",
                "on_event": "engaged",
                "on_timeout": "lapsed",
            },
            {"id": "lapsed", "type": "exit"},
            {"id": "engaged", "type": "exit"},
        ],
    )
    person = await contact(api)
    enrolled = (await enroll(api, key, person["id"]))["enrollment"]
    await wait_for_step(api, enrolled["id"], "wait-open")
    [sent] = await messages_of(hook_settings, enrolled["id"])
    response = await post_sendgrid(hooks, [sendgrid_event("open", sent.id, email=person["email"])])
    assert response.status_code == 200, response.text
    await result_of(time_env, enrolled["workflow_id"])
    view = await state(api, enrolled["id"])
    assert view["history"][-1]["step_id"] == "engaged"
    assert (await message_row(hook_settings, sent.id)).status == "opened"


def phone_number() -> str:
    return f"+1415{random.randrange(10**7):07d}"


async def test_twilio_status_callbacks_move_the_sms_forward_and_emit_events(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    phone = phone_number()
    person = await contact(api, phone=phone)
    sid = "SM" + uuid.uuid4().hex
    message = await sent_message(hook_settings, person["id"], phone, "sms", sid)
    for twilio_status in ("sent", "delivered", "sent"):  # callbacks may arrive out of order
        params = {"MessageSid": sid, "MessageStatus": twilio_status, "To": phone}
        response = await post_twilio(hooks, "/webhooks/twilio/status", params)
        assert response.status_code == 204, response.text
    row = await message_row(hook_settings, message.id)
    assert row.status == "delivered", "a late 'sent' does not go back"
    assert row.delivered_at is not None

    other_sid = "SM" + uuid.uuid4().hex
    failing = await sent_message(hook_settings, person["id"], phone, "sms", other_sid)
    for twilio_status in ("undelivered", "delivered"):
        params = {"MessageSid": other_sid, "MessageStatus": twilio_status, "ErrorCode": "30003"}
        assert (await post_twilio(hooks, "/webhooks/twilio/status", params)).status_code == 204
    row = await message_row(hook_settings, failing.id)
    assert row.status == "failed", "a late 'delivered' does not undo a failure"
    assert row.failed_at is not None and "30003" in (row.error or "")

    events = await events_with(
        hook_settings,
        [f"twilio:{sid}:delivered", f"twilio:{sid}:sent", f"twilio:{other_sid}:undelivered"],
    )
    assert sorted(e.name for e in events) == ["sms_delivered", "sms_failed"]
    assert all(str(e.contact_id) == person["id"] for e in events)


async def test_twilio_stop_and_start_change_the_sms_subscription(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    phone = phone_number()
    person = await contact(api, phone=phone)

    async def inbound(body: str) -> str:
        sid = "SM" + uuid.uuid4().hex
        params = {"MessageSid": sid, "From": phone, "To": "+15550100000", "Body": body}
        response = await post_twilio(hooks, "/webhooks/twilio/inbound", params)
        assert response.status_code == 200, response.text
        assert response.text.endswith("<Response></Response>")
        return sid

    async def subscription() -> tuple[str, list[str]]:
        async with session_scope(hook_settings.database_url) as session:
            row = await session.get(Contact, uuid.UUID(person["id"]))
            assert row is not None
            reasons = (
                await session.exec(
                    select(Suppression.reason)
                    .where(Suppression.channel == "sms")
                    .where(Suppression.address == phone)
                )
            ).all()
            return row.sms_status, list(reasons)

    stop = await inbound("  stop ")
    assert await subscription() == ("unsubscribed", ["sms_opt_out"])
    await inbound("Start")
    assert await subscription() == ("subscribed", [])
    await inbound("Quit")
    assert await subscription() == ("unsubscribed", ["sms_opt_out"])
    hello = await inbound("Is the stop by the station?")
    assert await subscription() == ("unsubscribed", ["sms_opt_out"])

    events = await events_with(hook_settings, [f"twilio:{stop}", f"twilio:{hello}"])
    assert {e.name for e in events} == {"sms_received"}
    assert {e.properties["body"] for e in events} == {"  stop ", "Is the stop by the station?"}
    assert all(str(e.contact_id) == person["id"] and "From" not in e.properties for e in events)


async def test_twilio_bad_signature_is_refused_and_nothing_is_stored(
    api: httpx.AsyncClient, hooks: httpx.AsyncClient, hook_settings: Settings
) -> None:
    phone = phone_number()
    person = await contact(api, phone=phone)
    sid = "SM" + uuid.uuid4().hex
    params = {"MessageSid": sid, "From": phone, "Body": "STOP"}
    forged = await post_twilio(hooks, "/webhooks/twilio/inbound", params, token="wrong-token")
    unsigned = await hooks.post("/webhooks/twilio/inbound", data=params)
    status_forged = await post_twilio(
        hooks,
        "/webhooks/twilio/status",
        {"MessageSid": sid, "MessageStatus": "delivered"},
        token="wrong-token",
    )
    assert (forged.status_code, unsigned.status_code, status_forged.status_code) == (403, 403, 403)
    async with session_scope(hook_settings.database_url) as session:
        row = await session.get(Contact, uuid.UUID(person["id"]))
        assert row is not None and row.sms_status == "subscribed"
        count = (
            await session.exec(
                select(func.count()).select_from(Event).where(col(Event.contact_id) == row.id)
            )
        ).one()
    assert count == 0
    assert await events_with(hook_settings, [f"twilio:{sid}", f"twilio:{sid}:delivered"]) == []
