"""Every step type, trigger, goal and control of the journey language, on Temporal's
time-skipping server with real activities, PostgreSQL and a local HTTP receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.contracts import JourneyInput
from models.db import session_scope
from models.tables import Contact, CrmTask, Enrollment, Journey, WebhookCall
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step
from tests.test_journey_workflow import messages_of, result_of
from worker import build_worker
from workflows.journey import JourneyWorkflow


async def journey(api: httpx.AsyncClient, steps: list[dict[str, Any]], **top: Any) -> str:
    """Publish a journey (creating the templates its sends name); return its key."""
    for step in steps:
        if step.get("type") in ("email", "sms"):
            if step["type"] == "email":
                await put_template(api, step["template"])
            else:
                await put_template(
                    api,
                    step["template"],
                    channel="sms",
                    text="Hi {{ contact.first_name }}",
                    subject=None,
                    html=None,
                )
    key = top.pop("key", None) or unique("j")
    await publish(api, {"key": key, "name": key, "steps": steps, **top})
    return key


async def enrollment_row(settings: Settings, enrollment_id: str) -> Enrollment:
    async with session_scope(settings.database_url) as session:
        row = await session.get(Enrollment, uuid.UUID(enrollment_id))
        assert row is not None
        return row


async def enrollments_of(settings: Settings, key: str) -> list[Enrollment]:
    async with session_scope(settings.database_url) as session:
        journey_id = (await session.exec(select(Journey.id).where(Journey.key == key))).one()
        rows = await session.exec(
            select(Enrollment)
            .where(Enrollment.journey_id == journey_id)
            .order_by(col(Enrollment.started_at))
        )
        return list(rows.all())


async def state(api: httpx.AsyncClient, enrollment_id: str) -> dict[str, Any]:
    response = await api.get(f"/v1/enrollments/{enrollment_id}")
    assert response.status_code == 200, response.text
    return dict(response.json())


def left_at(view: dict[str, Any], step: str) -> datetime:
    record = next(h for h in view["history"] if h["step_id"] == step)
    return datetime.fromisoformat(record["left_at"])


def outcome(view: dict[str, Any], step: str) -> str:
    return str(next(h for h in view["history"] if h["step_id"] == step)["outcome"])


async def test_sms_step_sends_to_the_outbox_and_skips_contacts_without_phone(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(time_api, [{"id": "text", "type": "sms", "template": unique("sms")}])
    with_phone = await contact(time_api, phone="+14155550100", attributes={"first_name": "Ada"})
    without = await contact(time_api)
    for person in (with_phone, without):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        person["messages"] = await messages_of(settings, enrolled["id"])
    [sent] = with_phone["messages"]
    assert sent.status == "sent" and sent.channel == "sms" and sent.to_address == "+14155550100"
    body = json.loads((settings.outbox_path / "sms" / f"{sent.id}.json").read_text())
    assert body["body"] == "Hi Ada" and body["to"] == "+14155550100"
    [skipped] = without["messages"]
    assert skipped.status == "skipped" and skipped.skip_reason == "contact has no phone"


async def test_split_is_deterministic_per_enrollment_and_recorded(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    a, b = unique("a"), unique("b")
    key = await journey(
        time_api,
        [
            {
                "id": "ab",
                "type": "split",
                "variants": [
                    {"weight": 50, "goto": "send-a", "name": "subject-a"},
                    {"weight": 50, "goto": "send-b", "name": "subject-b"},
                ],
            },
            {"id": "send-a", "type": "email", "template": a},
            {"id": "end-a", "type": "exit"},
            {"id": "send-b", "type": "email", "template": b},
        ],
    )
    chosen = {}
    for _ in range(12):
        person = await contact(time_api)
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        row = await enrollment_row(settings, enrolled["id"])
        [message] = await messages_of(settings, enrolled["id"])
        assert message.variant == row.variant
        assert message.template_key == (a if row.variant == "subject-a" else b)
        digest = hashlib.sha256(f"{enrolled['id']}:ab".encode()).digest()
        assert row.variant == (
            "subject-a" if int.from_bytes(digest[:8], "big") % 100 < 50 else "subject-b"
        )
        chosen[enrolled["id"]] = row.variant
    assert set(chosen.values()) == {"subject-a", "subject-b"}


async def test_update_contact_applies_attributes_tags_score_and_stage(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "qualify",
                "type": "update_contact",
                "set": {"plan": "pro", "seats": None},
                "add_tags": ["nurtured"],
                "remove_tags": ["cold"],
                "score": 20,
                "lifecycle_stage": "mql",
            },
            {"id": "again", "type": "update_contact", "score": 5},
        ],
    )
    person = await contact(time_api, tags=["cold", "vip"], attributes={"seats": 3})
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    async with session_scope(settings.database_url) as session:
        stored = await session.get(Contact, uuid.UUID(person["id"]))
    assert stored is not None
    assert stored.attributes == {"plan": "pro"}
    assert stored.tags == ["vip", "nurtured"]
    assert stored.score == 25 and stored.lifecycle_stage == "mql"


async def test_crm_step_creates_a_sales_task_once(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "handoff",
                "type": "crm",
                "action": "create_task",
                "note": "Warm lead: call within 24h",
                "due_in": "1d",
                "owner": "sales@example.com",
            },
        ],
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    async with session_scope(settings.database_url) as session:
        tasks = (
            await session.exec(select(CrmTask).where(CrmTask.contact_id == uuid.UUID(person["id"])))
        ).all()
    [task] = tasks
    assert task.note == "Warm lead: call within 24h" and task.owner == "sales@example.com"
    assert task.due_at is not None and task.step_id == "handoff"


class Receiver:
    """A local HTTP server playing a customer's webhook endpoint."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = answers
        self.calls: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.calls.append(
                    {"path": self.path, "headers": dict(self.headers), "body": body}
                )
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver([503, 200])
    yield r
    r.close()


async def test_webhook_step_is_signed_templated_and_retried(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    settings: Settings,
    receiver: Receiver,
) -> None:
    settings = settings.model_copy(update={"webhook_secret": "s3cret"})
    key = await journey(
        time_api,
        [
            {
                "id": "notify",
                "type": "webhook",
                "url": f"{receiver.url}/hooks/lead",
                "body": {"email": "{{ contact.email }}", "plan": "{{ trigger.properties.plan }}"},
            },
        ],
    )
    person = await contact(time_api)

    async with build_worker(time_env.client, settings):
        enrolled = (
            await enroll(time_api, key, person["id"], trigger={"properties": {"plan": "pro"}})
        )["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])
    assert outcome(view, "notify") == "webhook answered 200"
    assert len(receiver.calls) == 2  # a 503, then the retry
    last = receiver.calls[-1]
    assert json.loads(last["body"]) == {"email": person["email"], "plan": "pro"}
    stamp, signature = (
        part.split("=", 1)[1] for part in last["headers"]["X-Nurture-Signature"].split(",")
    )
    expected = hmac.new(b"s3cret", f"{stamp}.".encode() + last["body"], hashlib.sha256).hexdigest()
    assert signature == expected
    assert (
        receiver.calls[0]["headers"]["X-Nurture-Idempotency-Key"]
        == last["headers"]["X-Nurture-Idempotency-Key"]
    )


async def test_webhook_refusal_is_permanent_and_the_journey_goes_on(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    refusing = Receiver([404])
    try:
        after = unique("after")
        key = await journey(
            time_api,
            [
                {"id": "notify", "type": "webhook", "url": f"{refusing.url}/gone"},
                {"id": "after", "type": "email", "template": after},
            ],
        )
        person = await contact(time_api)
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
    finally:
        refusing.close()
    assert len(refusing.calls) == 1
    view = await state(time_api, enrolled["id"])
    assert "HTTP 404" in outcome(view, "notify")
    assert [m.step_id for m in await messages_of(settings, enrolled["id"])] == ["after"]
    async with session_scope(settings.database_url) as session:
        call = (
            await session.exec(
                select(WebhookCall)
                .where(WebhookCall.step_id == "notify")
                .where(WebhookCall.url == f"{refusing.url}/gone")
            )
        ).one()
    assert call.status_code == 404


async def test_enroll_step_starts_the_contact_in_another_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    target = await journey(time_api, [{"id": "hello", "type": "email", "template": unique("t")}])
    key = await journey(time_api, [{"id": "handover", "type": "enroll", "journey": target}])
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    [other] = await enrollments_of(settings, target)
    assert str(other.contact_id) == person["id"]
    await result_of(time_env, other.workflow_id)
    assert [m.step_id for m in await messages_of(settings, str(other.id))] == ["hello"]


async def test_wait_until_time_of_day_is_judged_in_the_contacts_zone(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "morning",
                "type": "wait",
                "until": {"time": "09:00", "weekdays": ["mon", "tue", "wed", "thu", "fri"]},
            },
            {"id": "done", "type": "exit"},
        ],
        default_timezone="America/New_York",
    )
    tokyo = await contact(time_api, timezone="Asia/Tokyo")
    nowhere = await contact(time_api)
    for person, zone in ((tokyo, "Asia/Tokyo"), (nowhere, "America/New_York")):
        enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
        await result_of(time_env, enrolled["workflow_id"])
        view = await state(time_api, enrolled["id"])
        started = datetime.fromisoformat(view["history"][0]["entered_at"])
        local = left_at(view, "morning").astimezone(ZoneInfo(zone))
        assert (local.hour, local.minute, local.second) == (9, 0, 0)
        assert local.weekday() < 5
        assert timedelta(0) < local - started <= timedelta(days=4)


async def test_wait_until_birthday_and_missing_dates(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "birthday",
                "type": "wait",
                "until": {"attr": "birthday", "yearly": True, "offset": "-1d", "time": "10:00"},
            },
            {"id": "done", "type": "exit"},
        ],
    )
    now = await time_env.get_current_time()
    birthday = (now + timedelta(days=40)).date().replace(year=1990)
    person = await contact(time_api, attributes={"birthday": birthday.isoformat()})
    unknown = await contact(time_api, attributes={"birthday": "one day"})
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    woke = left_at(await state(time_api, enrolled["id"]), "birthday").astimezone(UTC)
    assert (woke.month, woke.day, woke.hour) == (
        (birthday - timedelta(days=1)).month,
        (birthday - timedelta(days=1)).day,
        10,
    )
    enrolled = (await enroll(time_api, key, unknown["id"]))["enrollment"]
    await result_of(time_env, enrolled["workflow_id"])
    assert "not an ISO 8601 date" in outcome(await state(time_api, enrolled["id"]), "birthday")


async def test_send_window_defers_or_skips_outside_hours(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    now = (await time_env.get_current_time()).astimezone(UTC)
    opens = (now + timedelta(hours=3)).replace(minute=0, second=0, microsecond=0)
    closes = opens + timedelta(hours=1)
    window = {"from": opens.strftime("%H:%M"), "to": closes.strftime("%H:%M")}
    deferred = await journey(
        time_api, [{"id": "send", "type": "email", "template": unique("w"), "window": window}]
    )
    skipped = await journey(
        time_api,
        [
            {
                "id": "send",
                "type": "email",
                "template": unique("w"),
                "window": {**window, "outside": "skip"},
            },
        ],
    )
    person = await contact(time_api)
    first = (await enroll(time_api, deferred, person["id"]))["enrollment"]
    await result_of(time_env, first["workflow_id"])
    assert left_at(await state(time_api, first["id"]), "send") >= opens
    assert [m.status for m in await messages_of(settings, first["id"])] == ["sent"]
    second = (await enroll(time_api, skipped, person["id"]))["enrollment"]
    # Skipping time above may have moved the clock into the window; only judge when outside.
    await result_of(time_env, second["workflow_id"])
    view = await state(time_api, second["id"])
    if outcome(view, "send").startswith("email skipped"):
        assert await messages_of(settings, second["id"]) == []
    else:
        assert [m.status for m in await messages_of(settings, second["id"])] == ["sent"]


async def test_wait_for_condition_resolves_at_once_or_when_it_becomes_true(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "check",
                "type": "wait_for",
                "condition": {"attr": "plan", "value": "pro"},
                "timeout": "30d",
                "on_event": "yes",
                "on_timeout": "no",
            },
            {"id": "no", "type": "exit"},
            {"id": "yes", "type": "exit"},
        ],
    )
    already = await contact(time_api, attributes={"plan": "pro"})
    later = await contact(time_api, attributes={"plan": "free"})
    first = (await enroll(time_api, key, already["id"]))["enrollment"]
    await result_of(time_env, first["workflow_id"])
    view = await state(time_api, first["id"])
    assert outcome(view, "check") == "condition already true"
    assert view["history"][-1]["step_id"] == "yes"

    second = (await enroll(time_api, key, later["id"]))["enrollment"]
    await wait_for_step(time_api, second["id"], "check")
    await time_api.post(
        "/v1/contacts", json={"email": later["email"], "attributes": {"plan": "pro"}}
    )
    await result_of(time_env, second["workflow_id"])
    view = await state(time_api, second["id"])
    assert outcome(view, "check") == "condition true"
    assert view["history"][-1]["step_id"] == "yes"


async def test_goal_event_ends_the_journey_mid_wait(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {"id": "pause", "type": "wait", "duration": "3w"},
            {"id": "nudge", "type": "email", "template": unique("nudge")},
        ],
        exit_when={
            "any": [
                {"event": "purchase_completed"},
                {"attr": "lifecycle_stage", "value": "customer"},
            ]
        },
    )
    buyer = await contact(time_api)
    enrolled = (await enroll(time_api, key, buyer["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "pause")
    response = await time_api.post(
        "/v1/events",
        json={"id": unique("buy"), "contact_id": buyer["id"], "name": "purchase_completed"},
    )
    assert response.json()["delivered_to"] == 1
    result = await result_of(time_env, enrolled["workflow_id"])
    assert result.status == "exited" and result.exit_reason == "goal reached"
    view = await state(time_api, enrolled["id"])
    pause = next(h for h in view["history"] if h["step_id"] == "pause")
    assert pause["outcome"] == "interrupted"
    waited = datetime.fromisoformat(pause["left_at"]) - datetime.fromisoformat(pause["entered_at"])
    assert waited < timedelta(hours=1)
    assert await messages_of(settings, enrolled["id"]) == []
    row = await enrollment_row(settings, enrolled["id"])
    assert row.status == "exited" and row.goal == "exit_when met by event purchase_completed"


async def test_goal_attribute_change_ends_the_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [{"id": "pause", "type": "wait", "duration": "30d"}],
        exit_when={"attr": "lifecycle_stage", "value": "customer"},
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "pause")
    await time_api.post(
        "/v1/contacts", json={"email": person["email"], "lifecycle_stage": "customer"}
    )
    result = await result_of(time_env, enrolled["workflow_id"])
    assert result.status == "exited"
    assert (
        await enrollment_row(settings, enrolled["id"])
    ).goal == "exit_when met by contact profile"


async def test_concurrent_trigger_events_start_exactly_one_run(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [{"id": "pause", "type": "wait", "duration": "1d"}],
        trigger={"event": "page_viewed", "where": {"prop": "page", "value": "/pricing"}},
    )
    person = await contact(time_api)
    responses = await asyncio.gather(
        *[
            time_api.post(
                "/v1/events",
                json={
                    "id": unique("pv"),
                    "contact_id": person["id"],
                    "name": "page_viewed",
                    "properties": {"page": "/pricing"},
                },
            )
            for _ in range(50)
        ]
    )
    assert all(r.status_code == 202 for r in responses)
    [only] = await enrollments_of(settings, key)
    assert only.run_id is not None
    other = await contact(time_api)
    await time_api.post(
        "/v1/events",
        json={
            "id": unique("pv"),
            "contact_id": other["id"],
            "name": "page_viewed",
            "properties": {"page": "/blog"},
        },
    )
    assert len(await enrollments_of(settings, key)) == 1
    view = await state(time_api, str(only.id))
    assert view["current_step"] == "pause"


async def test_keyed_trigger_runs_one_journey_per_key_and_waits_match_the_key(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {
                "id": "bought",
                "type": "wait_for",
                "event": "order_completed",
                "timeout": "2d",
                "on_event": "thanks",
                "on_timeout": "remind",
            },
            {"id": "remind", "type": "email", "template": unique("remind")},
            {"id": "end", "type": "exit"},
            {"id": "thanks", "type": "exit"},
        ],
        trigger={"event": "cart_abandoned", "key": "cart_id"},
    )
    person = await contact(time_api)
    for cart in ("A", "B", "A"):
        await time_api.post(
            "/v1/events",
            json={
                "id": unique("cart"),
                "contact_id": person["id"],
                "name": "cart_abandoned",
                "properties": {"cart_id": cart},
            },
        )
    runs = {e.run_key: e for e in await enrollments_of(settings, key)}
    assert set(runs) == {"A", "B"}
    for run in runs.values():
        await wait_for_step(time_api, str(run.id), "bought")
    await time_api.post(
        "/v1/events",
        json={
            "id": unique("order"),
            "contact_id": person["id"],
            "name": "order_completed",
            "properties": {"cart_id": "A"},
        },
    )
    for run in runs.values():
        await result_of(time_env, run.workflow_id)
    a = await state(time_api, str(runs["A"].id))
    b = await state(time_api, str(runs["B"].id))
    assert a["history"][-1]["step_id"] == "thanks"
    assert b["history"][-1]["step_id"] == "end"
    assert [m.step_id for m in await messages_of(settings, str(runs["B"].id))] == ["remind"]
    assert await messages_of(settings, str(runs["A"].id)) == []


@pytest.mark.parametrize(
    ("reentry", "expected_runs"), [("never", 1), ("after_exit", 2), ({"after": "30d"}, 1)]
)
async def test_reentry_policy_decides_a_second_run(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
    reentry: Any,
    expected_runs: int,
) -> None:
    key = await journey(
        time_api,
        [{"id": "pause", "type": "wait", "duration": "1d"}],
        trigger={"event": "signed_up"},
        reentry=reentry,
    )
    person = await contact(time_api)
    for _ in range(2):
        await time_api.post(
            "/v1/events", json={"id": unique("su"), "contact_id": person["id"], "name": "signed_up"}
        )
        [*_, latest] = await enrollments_of(settings, key)
        await result_of(time_env, latest.workflow_id)
    runs = await enrollments_of(settings, key)
    assert len(runs) == expected_runs
    assert all(r.status == "completed" for r in runs)
    assert len({r.run_id for r in runs}) == expected_runs


async def test_pause_holds_sends_and_resume_goes_on_where_it_was(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {"id": "ready", "type": "wait_for", "event": "go"},
            {"id": "hello", "type": "email", "template": unique("hello")},
        ],
    )
    early = await contact(time_api)
    first = (await enroll(time_api, key, early["id"]))["enrollment"]
    await wait_for_step(time_api, first["id"], "ready")
    paused = await time_api.post(f"/v1/journeys/{key}/pause")
    assert paused.json() == {"key": key, "status": "paused", "enrollments_signalled": 1}
    late = await contact(time_api)
    second = await time_api.post(f"/v1/journeys/{key}/enrollments", json={"contact_id": late["id"]})
    assert second.status_code == 201, "new contacts still enter a paused journey"
    for person in (early, late):
        await time_api.post(
            "/v1/events", json={"id": unique("go"), "contact_id": person["id"], "name": "go"}
        )
    for enrolled in (first, second.json()["enrollment"]):
        await wait_for_step(time_api, enrolled["id"], "hello")
        for _ in range(100):
            view = await state(time_api, enrolled["id"])
            if view["waiting_for"] == "the journey to be resumed":
                break
            await asyncio.sleep(0.05)
        assert view["waiting_for"] == "the journey to be resumed"
        assert await messages_of(settings, enrolled["id"]) == []
    assert (await time_api.post(f"/v1/journeys/{key}/resume")).json()["enrollments_signalled"] == 2
    for enrolled in (first, second.json()["enrollment"]):
        await result_of(time_env, enrolled["workflow_id"])
        assert [m.status for m in await messages_of(settings, enrolled["id"])] == ["sent"]


async def test_stop_ends_every_enrollment_and_refuses_new_ones(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(time_api, [{"id": "pause", "type": "wait", "duration": "10d"}])
    people = [await contact(time_api) for _ in range(3)]
    enrolled = [(await enroll(time_api, key, p["id"]))["enrollment"] for p in people]
    for e in enrolled:
        await wait_for_step(time_api, e["id"], "pause")
    stopped = await time_api.post(f"/v1/journeys/{key}/stop")
    assert stopped.json()["enrollments_signalled"] == 3
    for e in enrolled:
        result = await result_of(time_env, e["workflow_id"])
        assert result.status == "exited" and result.exit_reason == "journey stopped"
    late = await contact(time_api)
    refused = await time_api.post(
        f"/v1/journeys/{key}/enrollments", json={"contact_id": late["id"]}
    )
    assert refused.status_code == 409 and "takes no new contacts" in refused.text
    assert (await time_api.post(f"/v1/journeys/{key}/resume")).status_code == 409


async def test_operator_moves_a_contact_or_ends_its_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    key = await journey(
        time_api,
        [
            {"id": "pause", "type": "wait", "duration": "30d"},
            {"id": "skipped", "type": "email", "template": unique("skipped")},
            {"id": "vip", "type": "email", "template": unique("vip")},
        ],
    )
    mover, leaver = await contact(time_api), await contact(time_api)
    moved = (await enroll(time_api, key, mover["id"]))["enrollment"]
    ended = (await enroll(time_api, key, leaver["id"]))["enrollment"]
    for e in (moved, ended):
        await wait_for_step(time_api, e["id"], "pause")
    bad = await time_api.post(
        f"/v1/enrollments/{moved['id']}/move", json={"action": "goto", "step": "nowhere"}
    )
    assert bad.status_code == 409 and "no step 'nowhere'" in bad.text
    bad_action = await time_api.post(
        f"/v1/enrollments/{moved['id']}/move", json={"action": "teleport"}
    )
    assert bad_action.status_code == 422
    ok = await time_api.post(
        f"/v1/enrollments/{moved['id']}/move", json={"action": "goto", "step": "vip"}
    )
    assert ok.status_code == 200, ok.text
    await time_api.post(
        f"/v1/enrollments/{ended['id']}/move", json={"action": "exit", "reason": "asked to stop"}
    )
    assert (await result_of(time_env, moved["workflow_id"])).status == "completed"
    assert [m.step_id for m in await messages_of(settings, moved["id"])] == ["vip"]
    result = await result_of(time_env, ended["workflow_id"])
    assert (result.status, result.exit_reason) == ("exited", "asked to stop")
    late = await time_api.post(f"/v1/enrollments/{ended['id']}/move", json={"action": "exit"})
    assert late.status_code == 409


async def test_loop_without_a_wait_fails_instead_of_spinning(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, time_worker: Worker
) -> None:
    key = await journey(
        time_api,
        [
            {"id": "a", "type": "goto", "step": "b"},
            {"id": "b", "type": "goto", "step": "a"},
        ],
    )
    person = await contact(time_api)
    enrolled = (await enroll(time_api, key, person["id"]))["enrollment"]
    result = await result_of(time_env, enrolled["workflow_id"])
    assert result.status == "failed" and "loop without a wait" in (result.exit_reason or "")


async def test_long_looping_journey_continues_as_new_with_bounded_history(
    time_env: WorkflowEnvironment, time_api: httpx.AsyncClient, settings: Settings
) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "tick", "type": "wait", "duration": "6d"},
        {"id": "count", "type": "update_contact", "score": 1},
        {"id": "enough", "type": "branch", "cases": [{"if": {"score_gte": 60}, "goto": "end"}]},
        {"id": "again", "type": "goto", "step": "tick"},
        {"id": "end", "type": "exit"},
    ]
    key = await journey(time_api, steps)
    person = await contact(time_api)
    version = (await time_api.get(f"/v1/journeys/{key}/versions/1")).json()
    async with build_worker(time_env.client, settings):
        # Started directly, with a small history budget, to force many hand-overs.
        run = await time_env.client.start_workflow(
            JourneyWorkflow.run,
            JourneyInput(
                str(uuid.uuid4()), key, 1, version["document"], person["id"], history_budget=150
            ),
            id=unique("budget"),
            task_queue=settings.task_queue,
        )
        async with asyncio.timeout(120):
            result = await run.result()
        assert result.status == "exited"
        lengths = []
        run_id: str | None = run.first_execution_run_id
        while run_id:
            history = await time_env.client.get_workflow_handle(
                run.id, run_id=run_id
            ).fetch_history()
            lengths.append(len(history.events))
            last = history.events[-1]
            run_id = (
                last.workflow_execution_continued_as_new_event_attributes.new_execution_run_id
                or None
            )
    assert len(lengths) > 3 and max(lengths) < 250
    async with session_scope(settings.database_url) as session:
        stored = await session.get(Contact, uuid.UUID(person["id"]))
    assert stored is not None and stored.score == 60


@pytest.mark.parametrize(
    ("condition", "holds"),
    [
        ({"attr": "role", "op": "eq", "value": "CMO"}, True),
        ({"attr": "role", "op": "ne", "value": "CMO"}, False),
        ({"attr": "seats", "op": "gt", "value": 10}, True),
        ({"attr": "seats", "op": "gte", "value": 13}, False),
        ({"attr": "seats", "op": "lt", "value": 13}, True),
        ({"attr": "seats", "op": "lte", "value": 11}, False),
        ({"attr": "role", "op": "in", "value": ["CMO", "CEO"]}, True),
        ({"attr": "role", "op": "not_in", "value": ["CMO"]}, False),
        ({"attr": "company", "op": "contains", "value": "Corp"}, True),
        ({"attr": "company", "op": "starts_with", "value": "Corp"}, False),
        ({"attr": "teams", "op": "eq", "value": "brand"}, True),
        ({"attr": "region", "op": "exists"}, False),
        ({"attr": "region", "op": "not_exists"}, True),
        ({"score_gte": 1}, False),
        ({"prop": "plan", "op": "eq", "value": "pro"}, True),
        ({"event": "page_viewed", "count_gte": 2}, True),
        ({"event": "page_viewed", "count_gte": 3}, False),
        (
            {
                "not": {
                    "any": [
                        {"attr": "role", "value": "CTO"},
                        {"attr": "seats", "op": "lt", "value": 5},
                    ]
                }
            },
            True,
        ),
    ],
)
async def test_branch_evaluates_every_operator_in_a_running_journey(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    condition: dict[str, Any],
    holds: bool,
) -> None:
    key = await journey(
        time_api,
        [
            {"id": "seen", "type": "wait_for", "event": "page_viewed", "timeout": "1h"},
            {"id": "seen-again", "type": "wait_for", "event": "page_viewed", "timeout": "1h"},
            {
                "id": "test",
                "type": "branch",
                "cases": [{"if": condition, "goto": "yes"}],
                "else": "no",
            },
            {"id": "yes", "type": "exit"},
            {"id": "no", "type": "exit"},
        ],
    )
    person = await contact(
        time_api,
        attributes={
            "role": "CMO",
            "seats": 12,
            "company": "Acme Corp",
            "teams": ["growth", "brand"],
        },
    )
    enrolled = (await enroll(time_api, key, person["id"], trigger={"properties": {"plan": "pro"}}))[
        "enrollment"
    ]
    for step in ("seen", "seen-again"):
        await wait_for_step(time_api, enrolled["id"], step)
        await time_api.post(
            "/v1/events",
            json={"id": unique("pv"), "contact_id": person["id"], "name": "page_viewed"},
        )
    await result_of(time_env, enrolled["workflow_id"])
    view = await state(time_api, enrolled["id"])
    assert view["history"][-1]["step_id"] == ("yes" if holds else "no")
