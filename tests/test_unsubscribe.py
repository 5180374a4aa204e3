"""RFC 8058 one-click unsubscribe and the unsubscribe page, end to end through a journey."""

from __future__ import annotations

import uuid
from email import message_from_bytes, policy
from email.message import EmailMessage

import httpx
from sqlmodel import select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.tokens import sign, verify
from models.db import session_scope
from models.tables import Contact, Event, Message, Suppression
from settings import Settings
from tests.helpers import contact, enroll, unique
from tests.test_journey_language import journey
from tests.test_journey_workflow import messages_of, result_of

ONE_CLICK = {"List-Unsubscribe": "One-Click"}


def _eml(settings: Settings, message: Message) -> EmailMessage:
    raw = (settings.outbox_path / "email" / f"{message.id}.eml").read_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    return parsed


def _body(eml: EmailMessage) -> str:
    return "".join(
        str(part.get_content()) for part in eml.walk() if part.get_content_maintype() == "text"
    )


async def _state(
    settings: Settings, message_id: uuid.UUID, contact_id: str, address: str
) -> tuple[Message, Contact, list[Suppression], list[Event]]:
    async with session_scope(settings.database_url) as session:
        message = await session.get(Message, message_id)
        person = await session.get(Contact, uuid.UUID(contact_id))
        suppressions = (
            await session.exec(select(Suppression).where(Suppression.address == address))
        ).all()
        events = (
            await session.exec(select(Event).where(Event.contact_id == uuid.UUID(contact_id)))
        ).all()
    assert message is not None and person is not None
    return message, person, list(suppressions), list(events)


async def _send_one(
    env: WorkflowEnvironment, api: httpx.AsyncClient, settings: Settings, contact_id: str
) -> Message:
    key = await journey(api, [{"id": "hello", "type": "email", "template": unique("tpl")}])
    enrolled = (await enroll(api, key, contact_id))["enrollment"]
    await result_of(env, enrolled["workflow_id"])
    [message] = await messages_of(settings, enrolled["id"])
    return message


def _no_key(api: httpx.AsyncClient) -> dict[str, str]:
    return {k: v for k, v in api.headers.items() if k.lower() != "authorization"}


def test_tokens_round_trip_and_refuse_forgeries() -> None:
    token = sign("unsubscribe", "abc", key="k")
    assert verify("unsubscribe", token, key="k") == "abc"
    assert verify("unsubscribe", token, key="other") is None
    assert verify("click", token, key="k") is None
    assert verify("unsubscribe", "abc." + token.split(".")[1][:-1] + "A", key="k") is None
    assert verify("unsubscribe", "garbage", key="k") is None


async def test_one_click_unsubscribe_suppresses_later_sends(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    person = await contact(time_api)
    message = await _send_one(time_env, time_api, settings, person["id"])
    assert message.status == "sent"
    eml = _eml(settings, message)
    unsubscribe_url = str(eml["List-Unsubscribe"]).strip("<>")
    assert unsubscribe_url.startswith(f"{settings.public_url}/u/")
    assert eml["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert unsubscribe_url in _body(eml)
    path = unsubscribe_url.removeprefix(settings.public_url)

    # Without the API key, as a mailbox provider would post it.
    async with httpx.AsyncClient(
        transport=time_api._transport, base_url=str(time_api.base_url), headers=_no_key(time_api)
    ) as anonymous:
        page = await anonymous.get(path)
        assert page.status_code == 200 and 'name="action" value="unsubscribe"' in page.text
        _, unchanged, suppressions, _ = await _state(
            settings, message.id, person["id"], person["email"]
        )
        assert unchanged.email_status == "subscribed" and suppressions == []

        for _ in range(2):  # idempotent
            response = await anonymous.post(path, data=ONE_CLICK, follow_redirects=False)
            assert response.status_code == 200, response.text

    stored, after, suppressions, events = await _state(
        settings, message.id, person["id"], person["email"]
    )
    assert stored.status == "unsubscribed" and stored.unsubscribed_at is not None
    assert after.email_status == "unsubscribed"
    assert [(s.channel, s.reason, s.source) for s in suppressions] == [
        ("email", "unsubscribed", "list-unsubscribe")
    ]
    assert [(e.name, e.idempotency_id) for e in events] == [
        ("email_unsubscribed", f"unsubscribe:{message.id}")
    ]
    assert events[0].delivered_at is not None

    second = await _send_one(time_env, time_api, settings, person["id"])
    assert second.status == "skipped"


async def test_page_button_unsubscribes_and_forged_tokens_are_refused(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    person = await contact(time_api)
    message = await _send_one(time_env, time_api, settings, person["id"])
    token = sign("unsubscribe", str(message.id), key="not-the-key")
    for forged in (token, "garbage", f"{message.id}.AAAA", sign("click", str(message.id), key="x")):
        assert (await time_api.post(f"/u/{forged}", data=ONE_CLICK)).status_code == 404
        assert (await time_api.get(f"/u/{forged}")).status_code == 404
    assert (await time_api.post(f"/u/{token}", data={"other": "1"})).status_code in (400, 404)
    _, unchanged, suppressions, events = await _state(
        settings, message.id, person["id"], person["email"]
    )
    assert unchanged.email_status == "subscribed" and suppressions == [] and events == []

    genuine = str(_eml(settings, message)["List-Unsubscribe"]).strip("<>")
    path = genuine.removeprefix(settings.public_url)
    assert (await time_api.post(path, data={"nothing": "here"})).status_code == 400
    response = await time_api.post(path, data={"action": "unsubscribe"})
    assert response.status_code == 200
    _, after, suppressions, _ = await _state(settings, message.id, person["id"], person["email"])
    assert after.email_status == "unsubscribed" and len(suppressions) == 1
