"""Our own open and click tracking (outbox/SMTP), end to end through a journey."""

from __future__ import annotations

import hashlib
import re
import uuid
from email import message_from_bytes, policy
from email.message import EmailMessage

import httpx
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from api.tokens import sign_url, track_html, verify_url
from models.db import session_scope
from models.tables import Event, Message
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step
from tests.test_journey_language import state
from tests.test_journey_workflow import messages_of, result_of

HTML = (
    "<html><body><p>"
    '<a href="https://example.com/a?x=1&amp;y=2">A</a> '
    "<a href='http://example.org/b'>B</a> "
    '<a href="mailto:hi@example.com">M</a>'
    "</p></body></html>"
)


def _html(settings: Settings, message: Message) -> str:
    raw = (settings.outbox_path / "email" / f"{message.id}.eml").read_bytes()
    parsed = message_from_bytes(raw, policy=policy.default)
    assert isinstance(parsed, EmailMessage)
    part = parsed.get_body(("html",))
    assert part is not None
    return str(part.get_content())


def _anonymous(api: httpx.AsyncClient) -> httpx.AsyncClient:
    headers = {k: v for k, v in api.headers.items() if k.lower() != "authorization"}
    return httpx.AsyncClient(transport=api._transport, base_url=str(api.base_url), headers=headers)


async def _message_and_events(
    settings: Settings, message_id: uuid.UUID
) -> tuple[Message, list[Event]]:
    async with session_scope(settings.database_url) as session:
        message = await session.get(Message, message_id)
        events = (
            await session.exec(
                select(Event).where(col(Event.idempotency_id).like(f"%:{message_id}%"))
            )
        ).all()
    assert message is not None
    return message, sorted(events, key=lambda e: e.name)


def test_track_html_rewrites_http_links_only() -> None:
    out = track_html(
        HTML + '<a href="https://x.test/u/tok">Unsubscribe</a>',
        base_url="https://n.test/",
        message_id="m1",
        key="k",
        skip="https://x.test/u/tok",
    )
    tokens = re.findall(r"https://n\.test/t/c/([^\"']+)", out)
    assert [verify_url("click", t, key="k") for t in tokens] == [
        ("m1", "https://example.com/a?x=1&y=2"),
        ("m1", "http://example.org/b"),
    ]
    assert 'href="mailto:hi@example.com"' in out and 'href="https://x.test/u/tok"' in out
    assert re.search(r'<img src="https://n\.test/t/o/m1\.[^"]+\.gif" width="1"[^>]*></body>', out)
    assert track_html("<p>x</p>", base_url="b", message_id="m", key="k").endswith('alt="">')
    assert verify_url("open", sign_url("click", "m", "https://a", key="k"), key="k") is None


async def test_open_and_click_tracking_drive_a_waiting_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    template = unique("tpl")
    await put_template(time_api, template, html=HTML)
    key = unique("j")
    await publish(
        time_api,
        {
            "key": key,
            "name": key,
            "steps": [
                {"id": "hello", "type": "email", "template": template},
                {
                    "id": "clicked",
                    "type": "wait_for",
                    "event": "email_clicked",
                    "timeout": "3d",
                    "on_event": "yes",
                    "on_timeout": "no",
                },
                {"id": "no", "type": "exit"},
                {"id": "yes", "type": "exit"},
            ],
        },
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "clicked")
    [message] = await messages_of(settings, enrolled["id"])
    html = _html(settings, message)
    base = settings.public_url.rstrip("/")
    assert "https://example.com/a" not in html and "http://example.org/b" not in html
    assert "mailto:hi@example.com" in html and f"{base}/u/" in html
    clicks = re.findall(rf"href=[\"']({re.escape(base)}/t/c/[^\"']+)[\"']", html)
    assert len(clicks) == 2
    [pixel] = re.findall(rf'<img src="({re.escape(base)}/t/o/[^"]+\.gif)"', html)

    async with _anonymous(time_api) as anonymous:
        for _ in range(2):
            gif = await anonymous.get(pixel.removeprefix(base))
            assert gif.status_code == 200 and gif.content.startswith(b"GIF89a")
            assert gif.headers["content-type"] == "image/gif"
            assert gif.headers["cache-control"] == "no-store"
        opened, events = await _message_and_events(settings, message.id)
        assert opened.status == "opened" and opened.opened_at is not None
        assert [(e.name, e.idempotency_id) for e in events] == [
            ("email_opened", f"open:{message.id}")
        ]

        response = await anonymous.get(clicks[0].removeprefix(base), follow_redirects=False)
        assert response.status_code == 302
        assert response.headers["location"] == "https://example.com/a?x=1&y=2"

    await result_of(time_env, enrolled["workflow_id"])
    assert (await state(time_api, enrolled["id"]))["history"][-1]["step_id"] == "yes"
    clicked, events = await _message_and_events(settings, message.id)
    assert clicked.status == "clicked" and clicked.clicked_at is not None
    digest = hashlib.sha256(b"https://example.com/a?x=1&y=2").hexdigest()[:16]
    assert [(e.name, e.idempotency_id, e.properties.get("url")) for e in events] == [
        ("email_clicked", f"click:{message.id}:{digest}", "https://example.com/a?x=1&y=2"),
        ("email_opened", f"open:{message.id}", None),
    ]


async def test_forged_tracking_tokens_record_nothing_and_never_redirect(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    template = unique("tpl")
    await put_template(time_api, template, html=HTML)
    key = unique("j")
    await publish(
        time_api,
        {
            "key": key,
            "name": key,
            "steps": [{"id": "hello", "type": "email", "template": template}],
        },
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    [message] = await messages_of(settings, enrolled["id"])
    base = settings.public_url.rstrip("/")
    [genuine, _] = re.findall(rf"{re.escape(base)}/t/c/([^\"']+)", _html(settings, message))
    payload, mac = genuine.rsplit(".", 1)
    evil = sign_url("click", str(message.id), "https://evil.test/", key="not-the-key")
    forged = [
        f"{payload}.{mac[:-1]}{'A' if mac[-1] != 'A' else 'B'}",
        evil,
        f"{evil.split('.')[0]}.{mac}",
        "garbage",
        sign_url("click", str(message.id), "javascript:alert(1)", key="x"),
    ]
    async with _anonymous(time_api) as anonymous:
        for token in forged:
            response = await anonymous.get(f"/t/c/{token}", follow_redirects=False)
            assert response.status_code == 404 and "location" not in response.headers
        gif = await anonymous.get("/t/o/garbage.gif")
        assert gif.status_code == 200 and gif.headers["content-type"] == "image/gif"
    stored, events = await _message_and_events(settings, message.id)
    assert stored.status == "sent" and events == []
