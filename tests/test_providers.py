"""Provider adapters driving the real SendGrid and Twilio SDKs against a local HTTP server
that plays the provider, smtplib against a real SMTP server (aiosmtpd), and journeys that
send through them on the time-skipping server."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import socket
import threading
import uuid
from collections.abc import Iterator
from email import message_from_bytes, policy
from email.message import EmailMessage
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.messaging import MessagingActivities, email_provider, sms_provider
from activities.providers import ProviderRejected, ProviderRetryable
from activities.providers.outbox import OutgoingEmail, OutgoingSms
from activities.providers.sendgrid import SendGridEmailProvider
from activities.providers.smtp import SmtpEmailProvider
from activities.providers.twilio_sms import TwilioSmsProvider
from models.db import session_scope
from models.tables import Contact, SubscriptionStatus
from settings import Settings
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_journey_language import journey, outcome, state
from tests.test_journey_workflow import messages_of, result_of
from worker import WORKFLOWS, build_activities, build_worker

ACCOUNT = "AC" + "0" * 32

Answer = tuple[int, dict[str, str], bytes]


def accepted(message_id: str) -> Answer:
    """SendGrid's answer to a good Mail Send: 202, empty body, X-Message-Id."""
    return 202, {"X-Message-Id": message_id}, b""


def sendgrid_error(status: int, message: str, field: str | None = None) -> Answer:
    body = {"errors": [{"message": message, "field": field, "help": None}]}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


def twilio_created(sid: str, to: str, sender: str, body: str) -> Answer:
    payload = {"sid": sid, "account_sid": ACCOUNT, "to": to, "from": sender, "body": body}
    payload["status"] = "queued"
    return 201, {"Content-Type": "application/json"}, json.dumps(payload).encode()


def twilio_error(status: int, code: int, message: str) -> Answer:
    body = {"code": code, "message": message, "more_info": "", "status": status}
    return status, {"Content-Type": "application/json"}, json.dumps(body).encode()


class FakeProvider:
    """A local HTTP server answering each POST with the next scripted answer."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                fake.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                status, headers, payload = fake.answers.pop(0)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def json(self, index: int = -1) -> dict[str, Any]:
        return dict(json.loads(self.calls[index]["body"]))

    def form(self, index: int = -1) -> dict[str, list[str]]:
        return parse_qs(self.calls[index]["body"].decode())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeProvider]:
    server = FakeProvider([])
    yield server
    server.close()


def an_email(**fields: Any) -> OutgoingEmail:
    values: dict[str, Any] = {
        "message_id": "7f6c2a7e-0000-4000-8000-000000000001",
        "to": "ada@example.com",
        "sender": "Nurture <hello@nurture.localhost>",
        "subject": "Hello Ada",
        "html": "<p>Hi Ada</p>",
        "text": "Hi Ada",
        "journey_key": "trial-nurture",
        "step_id": "offer",
        "variant": "B",
    }
    return OutgoingEmail(**{**values, **fields})


def an_sms() -> OutgoingSms:
    return OutgoingSms("7f6c2a7e-0000-4000-8000-000000000002", "+14155550100", "", "Hi Ada")


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_sendgrid_posts_mail_with_our_ids_and_returns_x_message_id(fake: FakeProvider) -> None:
    fake.answers = [accepted("sg-abc123")]
    provider = SendGridEmailProvider("SG.test-key", fake.url)

    assert provider.send(an_email()) == "sg-abc123"

    [call] = fake.calls
    assert call["path"] == "/v3/mail/send"
    assert call["headers"]["Authorization"] == "Bearer SG.test-key"
    body = fake.json()
    assert body["custom_args"] == {
        "nurture_message_id": "7f6c2a7e-0000-4000-8000-000000000001",
        "journey": "trial-nurture",
        "step": "offer",
        "variant": "B",
    }
    assert body["categories"] == ["journey:trial-nurture"]
    assert body["personalizations"] == [{"to": [{"email": "ada@example.com"}]}]
    assert body["from"] == {"name": "Nurture", "email": "hello@nurture.localhost"}
    assert body["subject"] == "Hello Ada"
    assert body["content"] == [
        {"type": "text/plain", "value": "Hi Ada"},
        {"type": "text/html", "value": "<p>Hi Ada</p>"},
    ]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_sendgrid_rate_limit_and_outage_are_retryable(fake: FakeProvider, status: int) -> None:
    fake.answers = [sendgrid_error(status, "slow down")]
    with pytest.raises(ProviderRetryable, match=f"HTTP {status}"):
        SendGridEmailProvider("SG.k", fake.url).send(an_email())


@pytest.mark.parametrize("status", [400, 401, 403, 413])
def test_sendgrid_refusal_is_permanent_and_carries_sendgrid_message(
    fake: FakeProvider, status: int
) -> None:
    fake.answers = [sendgrid_error(status, "Does not contain a valid address.", "to")]
    with pytest.raises(ProviderRejected) as refused:
        SendGridEmailProvider("SG.k", fake.url).send(an_email())
    assert str(refused.value) == (
        f"SendGrid answered HTTP {status}: to: Does not contain a valid address."
    )


def test_sendgrid_unreachable_is_retryable() -> None:
    provider = SendGridEmailProvider("SG.k", f"http://127.0.0.1:{unused_port()}")
    with pytest.raises(ProviderRetryable, match="SendGrid unreachable"):
        provider.send(an_email())


def test_twilio_creates_the_message_and_returns_its_sid(fake: FakeProvider) -> None:
    sid = "SM" + "1" * 32
    fake.answers = [twilio_created(sid, "+14155550100", "+15550100000", "Hi Ada")]
    provider = TwilioSmsProvider(ACCOUNT, "token", "+15550100000", fake.url)

    assert provider.send(an_sms()) == sid

    [call] = fake.calls
    assert call["path"] == f"/2010-04-01/Accounts/{ACCOUNT}/Messages.json"
    credentials = base64.b64encode(f"{ACCOUNT}:token".encode()).decode()
    assert call["headers"]["Authorization"] == f"Basic {credentials}"
    assert fake.form() == {"To": ["+14155550100"], "From": ["+15550100000"], "Body": ["Hi Ada"]}


@pytest.mark.parametrize(
    ("code", "text"),
    [
        (21610, "Attempt to send to unsubscribed recipient"),
        (21211, "The 'To' number is not a valid phone number."),
        (21614, "'To' number is not a valid mobile number"),
    ],
)
def test_twilio_unsubscribed_or_invalid_number_is_permanent(
    fake: FakeProvider, code: int, text: str
) -> None:
    fake.answers = [twilio_error(400, code, text)]
    provider = TwilioSmsProvider(ACCOUNT, "token", "+15550100000", fake.url)
    with pytest.raises(ProviderRejected) as refused:
        provider.send(an_sms())
    assert f"error {code}" in str(refused.value) and text in str(refused.value)


@pytest.mark.parametrize("status", [429, 500, 503])
def test_twilio_rate_limit_and_outage_are_retryable(fake: FakeProvider, status: int) -> None:
    fake.answers = [twilio_error(status, 20429 if status == 429 else 20500, "busy")]
    provider = TwilioSmsProvider(ACCOUNT, "token", "+15550100000", fake.url)
    with pytest.raises(ProviderRetryable, match=f"HTTP {status}"):
        provider.send(an_sms())


def test_twilio_unreachable_is_retryable() -> None:
    provider = TwilioSmsProvider(
        ACCOUNT, "token", "+15550100000", f"http://127.0.0.1:{unused_port()}"
    )
    with pytest.raises(ProviderRetryable, match="Twilio unreachable"):
        provider.send(an_sms())


class Mailbox:
    """aiosmtpd handler: keeps what it accepts; refuses recipients with a scripted reply."""

    def __init__(self) -> None:
        self.refuse_with: str | None = None
        self.delivered: list[tuple[Envelope, EmailMessage]] = []

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: Envelope, address: str, options: Any
    ) -> str:
        if self.refuse_with:
            return self.refuse_with
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        assert isinstance(envelope.content, bytes)
        message = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(message, EmailMessage)
        self.delivered.append((envelope, message))
        return "250 Message accepted for delivery"


@pytest.fixture
def smtp_server() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = unused_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    yield mailbox, port
    controller.stop()


def test_smtp_delivers_the_message_and_returns_its_message_id(
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp_server
    provider = SmtpEmailProvider("127.0.0.1", port, starttls=False)

    message_id = provider.send(an_email())

    [(envelope, delivered)] = mailbox.delivered
    assert envelope.mail_from == "hello@nurture.localhost"
    assert envelope.rcpt_tos == ["ada@example.com"]
    assert delivered["Message-ID"] == message_id
    assert message_id is not None and "7f6c2a7e-0000-4000-8000-000000000001" in message_id
    assert delivered["X-Nurture-Message-Id"] == "7f6c2a7e-0000-4000-8000-000000000001"
    assert delivered["Subject"] == "Hello Ada"
    text, html = delivered.get_body(("plain",)), delivered.get_body(("html",))
    assert text is not None and text.get_content().strip() == "Hi Ada"
    assert html is not None and html.get_content().strip() == "<p>Hi Ada</p>"


def test_smtp_permanent_refusal_is_rejected_and_temporary_is_retryable(
    smtp_server: tuple[Mailbox, int],
) -> None:
    mailbox, port = smtp_server
    provider = SmtpEmailProvider("127.0.0.1", port, starttls=False)
    mailbox.refuse_with = "550 5.1.1 No such user"
    with pytest.raises(ProviderRejected, match=re.escape("answered 550: 5.1.1 No such user")):
        provider.send(an_email())
    mailbox.refuse_with = "451 4.7.1 Greylisted, try again later"
    with pytest.raises(ProviderRetryable, match=re.escape("answered 451: 4.7.1 Greylisted")):
        provider.send(an_email())
    assert mailbox.delivered == []


def test_smtp_unreachable_is_retryable() -> None:
    provider = SmtpEmailProvider("127.0.0.1", unused_port(), starttls=False)
    with pytest.raises(ProviderRetryable):
        provider.send(an_email())


def test_provider_settings_choose_the_adapter_and_name_what_is_missing() -> None:
    assert email_provider(Settings()).name == "outbox"
    assert sms_provider(Settings()).name == "outbox"
    configured = Settings(
        email_provider="sendgrid",
        sendgrid_api_key="SG.k",
        sms_provider="twilio",
        twilio_account_sid=ACCOUNT,
        twilio_auth_token="token",
    )
    assert email_provider(configured).name == "sendgrid"
    assert sms_provider(configured).name == "twilio"
    assert email_provider(Settings(email_provider="smtp", smtp_host="mail")).name == "smtp"
    with pytest.raises(ValueError, match="NURTURE_SENDGRID_API_KEY"):
        email_provider(Settings(email_provider="sendgrid"))
    with pytest.raises(ValueError, match="NURTURE_SMTP_HOST"):
        email_provider(Settings(email_provider="smtp"))
    with pytest.raises(ValueError, match="NURTURE_TWILIO_AUTH_TOKEN"):
        sms_provider(Settings(sms_provider="twilio", twilio_account_sid=ACCOUNT))


def through_sendgrid(settings: Settings, fake: FakeProvider) -> Settings:
    return settings.model_copy(
        update={
            "email_provider": "sendgrid",
            "sendgrid_api_key": "SG.test",
            "sendgrid_base_url": fake.url,
        }
    )


async def test_journey_email_goes_through_sendgrid_after_a_rate_limit(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    fake: FakeProvider,
) -> None:
    fake.answers = [sendgrid_error(429, "too many requests"), accepted("sg-journey-1")]
    key = await journey(time_api, [{"id": "offer", "type": "email", "template": unique("t")}])
    person = await contact(time_api, attributes={"first_name": "Ada"})
    async with build_worker(time_env.client, through_sendgrid(settings, fake)):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])

    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "sent"
    assert message.provider == "sendgrid"
    assert message.provider_message_id == "sg-journey-1"
    assert len(fake.calls) == 2  # the 429, then Temporal's retry
    for index in range(2):
        args = fake.json(index)["custom_args"]
        assert args["nurture_message_id"] == str(message.id)
        assert args["journey"] == key and args["step"] == "offer"
    assert fake.json()["subject"] == "Hello Ada"
    assert fake.json()["personalizations"][0]["to"] == [{"email": person["email"]}]


async def test_journey_email_refused_by_sendgrid_is_failed_and_the_journey_goes_on(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    fake: FakeProvider,
) -> None:
    fake.answers = [
        sendgrid_error(400, "The from address does not match a verified Sender Identity."),
        accepted("sg-journey-2"),
    ]
    key = await journey(
        time_api,
        [
            {"id": "refused", "type": "email", "template": unique("t")},
            {"id": "after", "type": "email", "template": unique("t")},
        ],
    )
    person = await contact(time_api)
    async with build_worker(time_env.client, through_sendgrid(settings, fake)):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])

    assert len(fake.calls) == 2  # the refusal was not retried
    messages = {m.step_id: m for m in await messages_of(settings, enrolled["id"])}
    refused, after = messages["refused"], messages["after"]
    assert refused.status == "failed" and refused.provider_message_id is None
    assert refused.error == (
        "SendGrid answered HTTP 400: The from address does not match a verified Sender Identity."
    )
    assert after.status == "sent" and after.provider_message_id == "sg-journey-2"
    assert "failed" in outcome(view, "refused")


async def test_worker_dying_after_sendgrid_accepted_never_sends_twice(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    fake: FakeProvider,
) -> None:
    """The provider accepts, then the activity dies before it records the send: the retry
    finds the attempt under way, does not call SendGrid again, and says so."""
    fake.answers = [accepted("sg-once"), accepted("sg-twice")]
    through = through_sendgrid(settings, fake)
    messaging = MessagingActivities(through)
    real_send = messaging.email.send

    def send_then_die(email: OutgoingEmail) -> str | None:
        real_send(email)
        raise RuntimeError("worker killed after SendGrid accepted the message")

    messaging.email.send = send_then_die  # type: ignore[method-assign]
    activities = [
        a for a in build_activities(through) if getattr(a, "__name__", "") != "send_email"
    ]
    key = await journey(time_api, [{"id": "offer", "type": "email", "template": unique("t")}])
    person = await contact(time_api)
    async with Worker(
        time_env.client,
        task_queue=through.task_queue,
        workflows=WORKFLOWS,
        activities=[*activities, messaging.send_email],
    ):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])

    assert len(fake.calls) == 1
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "unconfirmed"
    assert outcome(view, "offer").startswith("email unconfirmed: an earlier attempt may have")


async def test_send_that_provably_failed_is_retried(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
) -> None:
    """Connection refused: SendGrid never saw it, so the retry may send."""
    through = settings.model_copy(
        update={
            "email_provider": "sendgrid",
            "sendgrid_api_key": "SG.test",
            "sendgrid_base_url": f"http://127.0.0.1:{unused_port()}",
        }
    )
    key = await journey(time_api, [{"id": "offer", "type": "email", "template": unique("t")}])
    person = await contact(time_api)
    async with build_worker(time_env.client, through):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        for _ in range(100):
            [*rows] = await messages_of(settings, enrolled["id"])
            if rows:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)
    [message] = await messages_of(settings, enrolled["id"])
    assert message.status == "pending"


async def test_suppressed_contact_never_reaches_sendgrid(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    fake: FakeProvider,
) -> None:
    """Unsubscribed after enrollment: the send activity checks at send time, SendGrid sees
    nothing, and the journey goes on."""
    fake.answers = [accepted("sg-should-not-happen")]
    key = await journey(
        time_api,
        [
            {"id": "ready", "type": "wait_for", "event": "go"},
            {"id": "offer", "type": "email", "template": unique("t")},
        ],
    )
    person = await contact(time_api)
    async with build_worker(time_env.client, through_sendgrid(settings, fake)):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await wait_for_step(time_api, enrolled["id"], "ready")
        async with session_scope(settings.database_url) as session:
            stored = await session.get(Contact, uuid.UUID(person["id"]))
            assert stored is not None
            stored.email_status = SubscriptionStatus.unsubscribed
            session.add(stored)
        await time_api.post(
            "/v1/events", json={"id": unique("go"), "contact_id": person["id"], "name": "go"}
        )
        await result_of(time_env, enrolled["workflow_id"])
    assert fake.calls == []
    [message] = await messages_of(settings, enrolled["id"])
    assert (message.status, message.skip_reason) == ("skipped", "email unsubscribed")
