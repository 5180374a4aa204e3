"""Broadcasts: the API (happy paths and bad input), sends through the journeys' send core
(suppression at send time, frequency caps, exactly once under retries), pause and resume
mid-send, error policies, the rate measured at a local server playing SendGrid, and
local-time delivery with time skipping."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlmodel import col, func, select
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.client import WorkflowExecutionStatus, WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.broadcasts import BroadcastActivities
from activities.messaging import MessagingActivities
from activities.providers.outbox import OutgoingEmail
from models.db import session_scope
from models.tables import (
    Broadcast,
    BroadcastRecipient,
    Contact,
    Message,
    MessageChannel,
    SubscriptionStatus,
    Suppression,
    SuppressionReason,
)
from settings import Settings
from tests.helpers import put_template, unique
from tests.test_segments import put_segment
from worker import WORKFLOWS, build_activities, build_worker


class SendGridPlayer:
    """A local server playing SendGrid's Mail Send: records when each request arrived and
    for whom, and answers 202, or per recipient the scripted statuses first."""

    def __init__(self) -> None:
        self.arrivals: list[tuple[float, str, int]] = []
        self.scripts: dict[str, list[int]] = {}
        self.lock = threading.Lock()
        player = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                arrived = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                to = body["personalizations"][0]["to"][0]["email"]
                with player.lock:
                    script = player.scripts.get(to) or []
                    status = script.pop(0) if script else 202
                    player.arrivals.append((arrived, to, status))
                payload = b""
                if status != 202:
                    payload = json.dumps({"errors": [{"message": f"scripted {status}"}]}).encode()
                self.send_response(status)
                if status == 202:
                    self.send_header("X-Message-Id", f"sg-{uuid.uuid4().hex[:12]}")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def accepted(self) -> list[str]:
        return [to for _, to, status in self.arrivals if status == 202]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def sendgrid() -> Iterator[SendGridPlayer]:
    player = SendGridPlayer()
    yield player
    player.close()


def through(settings: Settings, player: SendGridPlayer, **more: Any) -> Settings:
    return settings.model_copy(
        update={
            "email_provider": "sendgrid",
            "sendgrid_api_key": "SG.test",
            "sendgrid_base_url": player.url,
            **more,
        }
    )


async def audience(
    api: httpx.AsyncClient, settings: Settings, people: list[dict[str, Any]]
) -> tuple[str, list[dict[str, Any]]]:
    """A segment holding exactly these new contacts; (segment key, contacts as stored)."""
    cohort, segment = unique("cohort"), unique("seg")
    rows = [
        {"email": f"{unique('bc')}@example.com", **p, "attributes": {"cohort": cohort}}
        for p in people
    ]
    response = await api.post("/v1/contacts/import", json=rows)
    assert response.status_code < 300, response.text
    await put_segment(api, segment, {"attr": "cohort", "op": "eq", "value": cohort})
    async with session_scope(settings.database_url) as session:
        stored = (
            await session.exec(
                select(Contact).where(col(Contact.email).in_([r["email"] for r in rows]))
            )
        ).all()
    by_email = {c.email: c for c in stored}
    return segment, [{"id": str(by_email[r["email"]].id), "email": r["email"], **r} for r in rows]


async def create(api: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    response = await api.post("/v1/broadcasts", json=body)
    assert response.status_code == 201, response.text
    return dict(response.json())


async def finished(env: WorkflowEnvironment, broadcast: dict[str, Any]) -> dict[str, Any]:
    """The broadcast workflow's result; on the time-skipping server, skipping time while it
    runs (the API started it, so time skipping is unlocked here, as in result_of)."""
    client = env.client
    run_id = (await client.get_workflow_handle(broadcast["workflow_id"]).describe()).run_id
    handle = client.get_workflow_handle(broadcast["workflow_id"], run_id=run_id)
    skipping = env.supports_time_skipping
    if skipping:
        await client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
    try:
        async with asyncio.timeout(120):
            return dict(await handle.result())
    finally:
        if skipping:
            await client.test_service.lock_time_skipping(LockTimeSkippingRequest())


async def wait_for(
    api: httpx.AsyncClient, key: str, check: Any, seconds: float = 60
) -> dict[str, Any]:
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        view = (await api.get(f"/v1/broadcasts/{key}")).json()
        if check(view):
            return dict(view)
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"broadcast never got there: {view}")
        await asyncio.sleep(0.05)


async def broadcast_messages(settings: Settings, broadcast_id: str) -> list[Message]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Message).where(Message.broadcast_id == uuid.UUID(broadcast_id))
        )
        return list(rows.all())


async def recipients(settings: Settings, broadcast_id: str) -> dict[str, BroadcastRecipient]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(BroadcastRecipient).where(
                BroadcastRecipient.broadcast_id == uuid.UUID(broadcast_id)
            )
        )
        return {str(r.contact_id): r for r in rows.all()}


async def test_broadcast_sends_once_to_each_member_and_checks_suppression_at_send_time(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    template = unique("bt")
    await put_template(time_api, template, subject="News for {{ contact.email }}")
    segment, people = await audience(time_api, settings, [{} for _ in range(5)])
    unsubscribed, suppressed_later = people[0], people[1]
    async with session_scope(settings.database_url) as session:
        row = await session.get(Contact, uuid.UUID(unsubscribed["id"]))
        assert row is not None
        row.email_status = SubscriptionStatus.unsubscribed
        session.add(row)
    send_at = datetime.now(UTC) + timedelta(hours=2)
    async with build_worker(time_env.client, through(settings, sendgrid)):
        broadcast = await create(
            time_api,
            key=unique("news"),
            template=template,
            segment=segment,
            send_at=send_at.isoformat(),
        )
        assert broadcast["status"] == "scheduled" and broadcast["total"] is None
        assert broadcast["channel"] == "email" and broadcast["burst"] == 10
        # Suppressed after the broadcast was made, before it sends: checked at send time.
        async with session_scope(settings.database_url) as session:
            session.add(
                Suppression(
                    channel=MessageChannel.email,
                    address=suppressed_later["email"],
                    reason=SuppressionReason.bounced,
                )
            )
        result = await finished(time_env, broadcast)
    assert result["status"] == "completed"
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert (view["total"], view["sent"], view["skipped"], view["failed"]) == (5, 3, 2, 0)
    assert view["status"] == "completed" and view["pending"] == 0
    assert sorted(sendgrid.accepted()) == sorted(p["email"] for p in people[2:])
    messages = {str(m.contact_id): m for m in await broadcast_messages(settings, broadcast["id"])}
    assert len(messages) == 5
    assert messages[unsubscribed["id"]].skip_reason == "email unsubscribed"
    assert messages[suppressed_later["id"]].skip_reason == "address suppressed (bounced)"
    for person in people[2:]:
        message = messages[person["id"]]
        assert message.status == "sent" and message.subject == f"News for {person['email']}"
        assert message.idempotency_key == f"broadcast:{broadcast['id']}:{person['id']}"
    listed = (await time_api.get("/v1/broadcasts", params={"status": "completed"})).json()
    assert broadcast["key"] in [b["key"] for b in listed]


async def test_broadcast_sends_exactly_once_when_batches_fail_and_are_retried(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, people = await audience(time_api, settings, [{} for _ in range(8)])
    # One address answers 500 twice (never accepted: sent again later), and the worker
    # "dies" right after SendGrid accepted another one (it may not be sent again).
    sendgrid.scripts[people[2]["email"]] = [500, 503]
    dies_after = people[5]["email"]
    configured = through(settings, sendgrid)
    messaging = MessagingActivities(configured)
    real_send = messaging.email.send

    def send_then_die(email: OutgoingEmail) -> str | None:
        provider_id = real_send(email)
        if email.to == dies_after:
            raise RuntimeError("worker killed after SendGrid accepted the message")
        return provider_id

    messaging.email.send = send_then_die  # type: ignore[method-assign]
    campaign = BroadcastActivities(configured, messaging)
    replaced = {"send_broadcast_batch"}
    activities = [
        a for a in build_activities(configured) if getattr(a, "__name__", "") not in replaced
    ]
    async with Worker(
        time_env.client,
        task_queue=configured.task_queue,
        workflows=WORKFLOWS,
        activities=[*activities, campaign.send_broadcast_batch],
    ):
        broadcast = await create(
            time_api, key=unique("retry"), template=template, segment=segment, burst=3
        )
        await finished(time_env, broadcast)
    accepted = sendgrid.accepted()
    assert sorted(accepted) == sorted(p["email"] for p in people)  # each exactly once
    messages = {str(m.contact_id): m for m in await broadcast_messages(settings, broadcast["id"])}
    assert len(messages) == 8
    assert messages[people[5]["id"]].status == "unconfirmed"
    assert {messages[p["id"]].status for i, p in enumerate(people) if i != 5} == {"sent"}
    assert [to for _, to, status in sendgrid.arrivals if status != 202] == [people[2]["email"]] * 2
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert (view["sent"], view["failed"], view["skipped"]) == (8, 0, 0)


async def test_broadcast_frequency_cap_skips_contacts_already_at_the_cap(
    dev_env: WorkflowEnvironment, dev_api: httpx.AsyncClient, settings: Settings
) -> None:
    # The real clock: the cap counts back from the broadcast's clock over stored sends.
    template = unique("bt")
    await put_template(dev_api, template)
    segment, _ = await audience(dev_api, settings, [{} for _ in range(3)])
    capped = settings.model_copy(update={"email_daily_cap": 1})
    async with build_worker(dev_env.client, capped):
        first = await create(dev_api, key=unique("cap1"), template=template, segment=segment)
        await finished(dev_env, first)
        second = await create(dev_api, key=unique("cap2"), template=template, segment=segment)
        await finished(dev_env, second)
    assert {m.status for m in await broadcast_messages(settings, first["id"])} == {"sent"}
    again = await broadcast_messages(settings, second["id"])
    assert len(again) == 3 and {m.status for m in again} == {"skipped"}
    assert {m.skip_reason for m in again} == {"1 email a day already sent"}


async def test_broadcast_local_time_releases_each_zone_at_its_own_nine_oclock(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    zones = ["Asia/Tokyo", "Europe/Paris", "America/New_York", None]
    segment, people = await audience(
        time_api, settings, [{"timezone": z} if z else {} for z in zones]
    )
    day = (datetime.now(UTC) + timedelta(days=3)).date()
    local = f"{day.isoformat()}T09:00:00"
    async with build_worker(time_env.client, settings):
        broadcast = await create(
            time_api,
            key=unique("local"),
            template=template,
            segment=segment,
            local_time=local,
            default_timezone="America/Los_Angeles",
        )
        assert broadcast["local_time"] == local
        result = await finished(time_env, broadcast)
    assert result["sent"] == 4
    got = await recipients(settings, broadcast["id"])
    expected_zone = ["Asia/Tokyo", "Europe/Paris", "America/New_York", "America/Los_Angeles"]
    for person, zone in zip(people, expected_zone, strict=True):
        recipient = got[person["id"]]
        assert recipient.zone == zone and recipient.outcome == "sent"
        assert recipient.released_at is not None
        released = recipient.released_at.astimezone(ZoneInfo(zone))
        assert (released.date(), released.hour, released.minute) == (day, 9, 0), zone
    order = sorted(got.values(), key=lambda r: r.released_at or datetime.max.replace(tzinfo=UTC))
    assert [r.zone for r in order][:3] == ["Asia/Tokyo", "Europe/Paris", "America/New_York"]


async def test_broadcast_error_policy_skip_records_the_failing_contact_and_goes_on(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, people = await audience(time_api, settings, [{} for _ in range(4)])
    sendgrid.scripts[people[0]["email"]] = [400]  # refused for good
    sendgrid.scripts[people[1]["email"]] = [503] * 50  # down for this one, whatever we do
    async with build_worker(time_env.client, through(settings, sendgrid)):
        broadcast = await create(time_api, key=unique("skip"), template=template, segment=segment)
        result = await finished(time_env, broadcast)
    assert result["status"] == "completed"
    got = await recipients(settings, broadcast["id"])
    assert got[people[0]["id"]].outcome == "failed"
    assert "HTTP 400" in (got[people[0]["id"]].reason or "")
    assert got[people[1]["id"]].outcome == "failed"
    assert "kept failing" in (got[people[1]["id"]].reason or "")
    assert {got[p["id"]].outcome for p in people[2:]} == {"sent"}
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert (view["sent"], view["failed"]) == (2, 2)
    # The unavailable one was tried once per batch attempt, then given up.
    assert len([a for a in sendgrid.arrivals if a[1] == people[1]["email"]]) == 6


async def test_broadcast_error_policy_pause_stops_on_a_refusal_until_resumed(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, people = await audience(time_api, settings, [{} for _ in range(6)])
    first = min(people, key=lambda p: uuid.UUID(p["id"]))  # the first batch takes it
    sendgrid.scripts[first["email"]] = [400]
    async with build_worker(time_env.client, through(settings, sendgrid)):
        broadcast = await create(
            time_api,
            key=unique("pause"),
            template=template,
            segment=segment,
            error_policy="pause",
            burst=1,
            rate={"count": 1, "per": "second"},
        )
        paused = await wait_for(time_api, broadcast["key"], lambda v: v["status"] == "paused")
        assert "a send was refused" in paused["status_reason"]
        assert paused["failed"] == 1 and paused["sent"] == 0 and paused["pending"] == 5
        live = paused["live"]
        assert live is not None and live["status"] == "paused"
        resumed = await time_api.post(f"/v1/broadcasts/{broadcast['key']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "sending"
        result = await finished(time_env, broadcast)
    assert result["status"] == "completed"
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert (view["status"], view["sent"], view["failed"]) == ("completed", 5, 1)
    assert sorted(sendgrid.accepted()) == sorted(p["email"] for p in people if p is not first)


async def test_broadcast_pauses_and_resumes_mid_send_without_losing_or_repeating_anyone(
    dev_env: WorkflowEnvironment,
    dev_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    template = unique("bt")
    await put_template(dev_api, template)
    segment, people = await audience(dev_api, settings, [{} for _ in range(12)])
    async with build_worker(dev_env.client, through(settings, sendgrid)):
        broadcast = await create(
            dev_api,
            key=unique("mid"),
            template=template,
            segment=segment,
            rate={"count": 4, "per": "second"},
            burst=2,
        )
        await wait_for(dev_api, broadcast["key"], lambda v: v["sent"] >= 2)
        paused = await dev_api.post(
            f"/v1/broadcasts/{broadcast['key']}/pause", json={"reason": "typo in subject"}
        )
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
        assert paused.json()["status_reason"] == "typo in subject"
        await asyncio.sleep(0.5)  # the batch under way, if any, lands
        held = len(sendgrid.accepted())
        await asyncio.sleep(1.5)
        assert len(sendgrid.accepted()) == held < 12  # nothing leaves while paused
        again = await dev_api.post(f"/v1/broadcasts/{broadcast['key']}/pause")
        assert again.status_code == 200  # pausing a paused broadcast is harmless
        resumed = await dev_api.post(f"/v1/broadcasts/{broadcast['key']}/resume")
        assert resumed.status_code == 200, resumed.text
        await finished(dev_env, broadcast)
    assert sorted(sendgrid.accepted()) == sorted(p["email"] for p in people)
    view = (await dev_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert (view["status"], view["sent"]) == ("completed", 12)
    for action in ("pause", "resume", "cancel"):
        late = await dev_api.post(f"/v1/broadcasts/{broadcast['key']}/{action}")
        assert late.status_code == 409 and "completed" in late.text


async def test_broadcast_rate_never_exceeds_the_configured_rate_plus_burst(
    dev_env: WorkflowEnvironment,
    dev_api: httpx.AsyncClient,
    settings: Settings,
    sendgrid: SendGridPlayer,
) -> None:
    rate, burst, count = 20, 5, 70
    template = unique("bt")
    await put_template(dev_api, template)
    segment, _ = await audience(dev_api, settings, [{} for _ in range(count)])
    async with build_worker(dev_env.client, through(settings, sendgrid)):
        broadcast = await create(
            dev_api,
            key=unique("rate"),
            template=template,
            segment=segment,
            rate={"count": rate, "per": "second"},
            burst=burst,
        )
        await finished(dev_env, broadcast)
    times = sorted(t for t, _, _ in sendgrid.arrivals)
    assert len(times) == count
    # The documented bound: at most burst + rate * W in any window of W seconds.
    for window in (0.25, 0.5, 1.0, 2.0):
        busiest = max(
            sum(1 for t in times[i:] if t < start + window) for i, start in enumerate(times)
        )
        assert busiest <= burst + rate * window, (window, busiest)
    # And it is throttled at all: 70 sends at 20/s after a burst of 5 take >= 3.25 s.
    assert times[-1] - times[0] >= (count - burst) / rate - 0.05


async def test_broadcast_scheduled_can_be_cancelled_and_sends_nothing(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, _ = await audience(time_api, settings, [{}])
    async with build_worker(time_env.client, settings):
        broadcast = await create(
            time_api,
            key=unique("cancel"),
            template=template,
            segment=segment,
            send_at=(datetime.now(UTC) + timedelta(days=1)).isoformat(),
        )
        cancelled = await time_api.post(f"/v1/broadcasts/{broadcast['key']}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        handle = time_env.client.get_workflow_handle(broadcast["workflow_id"])
        for _ in range(100):
            if (await handle.describe()).status == WorkflowExecutionStatus.CANCELED:
                break
            await asyncio.sleep(0.05)
        assert (await handle.describe()).status == WorkflowExecutionStatus.CANCELED
    assert await broadcast_messages(settings, broadcast["id"]) == []
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert view["status"] == "cancelled" and view["total"] is None


async def test_broadcast_api_refuses_bad_input_and_stores_nothing(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    email, sms = unique("bt"), unique("bs")
    await put_template(time_api, email)
    await put_template(time_api, sms, channel="sms", text="Hi", subject=None, html=None)
    segment, _ = await audience(time_api, settings, [{}])
    existing = unique("exists")
    async with build_worker(time_env.client, settings):
        await create(time_api, key=existing, template=email, segment=segment)
        good = {"key": unique("b"), "template": email, "segment": segment}
        soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        cases: list[tuple[dict[str, Any], int, str]] = [
            ({**good, "key": existing}, 409, "key"),
            ({**good, "key": "Bad Key"}, 422, "key"),
            ({**good, "template": "no-such-template"}, 422, "template: no template"),
            ({**good, "template": sms, "channel": "email"}, 422, "template"),
            ({**good, "channel": "fax"}, 422, "channel"),
            ({**good, "segment": "no-such-segment"}, 422, "segment: no segment"),
            ({**good, "send_at": "2030-01-01T09:00:00"}, 422, "send_at needs an offset"),
            ({**good, "send_at": "2001-01-01T09:00:00Z"}, 422, "send_at"),
            ({**good, "send_at": soon, "local_time": "2030-01-01T09:00"}, 422, "not both"),
            ({**good, "local_time": "2030-01-01T09:00:00+02:00"}, 422, "without an offset"),
            ({**good, "local_time": "tomorrow at nine"}, 422, "local_time"),
            ({**good, "default_timezone": "Mars/Base"}, 422, "unknown time zone"),
            ({**good, "rate": {"count": 0}}, 422, "count"),
            ({**good, "rate": {"count": 5, "per": "hour"}}, 422, "per"),
            ({**good, "burst": 0}, 422, "burst"),
            ({**good, "error_policy": "retry"}, 422, "error_policy"),
            ({**good, "surprise": 1}, 422, "surprise"),
            ({"key": unique("b"), "segment": segment}, 422, "template"),
        ]
        async with session_scope(settings.database_url) as session:
            before = (await session.exec(select(func.count()).select_from(Broadcast))).one()
        for body, code, words in cases:
            response = await time_api.post("/v1/broadcasts", json=body)
            assert response.status_code == code, (body, response.text)
            assert words in response.text, (body, response.text)
        async with session_scope(settings.database_url) as session:
            after = (await session.exec(select(func.count()).select_from(Broadcast))).one()
        assert after == before
        assert (await time_api.get("/v1/broadcasts/no-such-one")).status_code == 404
        assert (await time_api.get("/v1/broadcasts/Bad Key")).status_code == 422
        assert (await time_api.get("/v1/broadcasts", params={"status": "odd"})).status_code == 422
        for action in ("pause", "resume", "cancel"):
            missing = await time_api.post(f"/v1/broadcasts/no-such-one/{action}")
            assert missing.status_code == 404 and "no broadcast" in missing.text
        fresh = await create(time_api, **good)
        not_paused = await time_api.post(f"/v1/broadcasts/{fresh['key']}/resume")
        assert not_paused.status_code == 409 and "not paused" in not_paused.text
        bad_reason = await time_api.post(
            f"/v1/broadcasts/{fresh['key']}/pause", json={"reason": "x" * 501}
        )
        assert bad_reason.status_code == 422 and "reason" in bad_reason.text
        await finished(time_env, fresh)


async def test_broadcast_paused_before_its_send_time_holds_until_resumed(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, people = await audience(time_api, settings, [{}, {}])
    async with build_worker(time_env.client, settings):
        broadcast = await create(
            time_api,
            key=unique("held"),
            template=template,
            segment=segment,
            send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        )
        paused = await time_api.post(f"/v1/broadcasts/{broadcast['key']}/pause")
        assert paused.status_code == 200 and paused.json()["status"] == "paused"
        await time_env.sleep(timedelta(hours=3))  # well past send_at
        view = await wait_for(time_api, broadcast["key"], lambda v: v["total"] == 2)
        assert view["status"] == "paused" and view["sent"] == 0
        assert view["live"]["status"] == "paused"
        assert await broadcast_messages(settings, broadcast["id"]) == []
        resumed = await time_api.post(f"/v1/broadcasts/{broadcast['key']}/resume")
        assert resumed.status_code == 200 and resumed.json()["status"] == "sending"
        result = await finished(time_env, broadcast)
    assert result["sent"] == 2 and len(people) == 2


async def test_broadcast_whose_segment_vanished_before_its_send_time_fails_saying_why(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    template = unique("bt")
    await put_template(time_api, template)
    segment, _ = await audience(time_api, settings, [{}])
    async with build_worker(time_env.client, settings):
        broadcast = await create(
            time_api,
            key=unique("gone"),
            template=template,
            segment=segment,
            send_at=(datetime.now(UTC) + timedelta(hours=1)).isoformat(),
        )
        assert (await time_api.delete(f"/v1/segments/{segment}")).status_code == 204
        with pytest.raises(WorkflowFailureError):
            await finished(time_env, broadcast)
    view = (await time_api.get(f"/v1/broadcasts/{broadcast['key']}")).json()
    assert view["status"] == "failed" and f"no segment '{segment}'" in view["status_reason"]
    assert await broadcast_messages(settings, broadcast["id"]) == []
