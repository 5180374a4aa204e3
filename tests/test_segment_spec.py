"""Segment-spec endpoints: a CDP's batches round-trip into contacts and journeys; malformed
batches are refused whole; anonymous visitors merge into identified contacts."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import httpx
import pytest
from sqlmodel import col, select
from temporalio.client import WorkflowExecutionStatus
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from models.db import session_scope
from models.tables import Contact, Enrollment, Event
from settings import Settings
from tests.helpers import contact, enroll, unique, wait_for_step
from tests.test_api import count
from tests.test_journey_language import enrollments_of, journey


def basic(key: str) -> dict[str, str]:
    """Segment's auth: the write key as HTTP Basic username, empty password."""
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


async def post_batch(api: httpx.AsyncClient, calls: list[Any], **extra: Any) -> httpx.Response:
    return await api.post("/v1/batch", json={"batch": calls, **extra})


async def contact_by(settings: Settings, **where: Any) -> Contact:
    async with session_scope(settings.database_url) as session:
        query = select(Contact)
        for name, value in where.items():
            query = query.where(getattr(Contact, name) == value)
        return (await session.exec(query)).one()


async def events_of(settings: Settings, contact_id: Any) -> list[Event]:
    async with session_scope(settings.database_url) as session:
        rows = await session.exec(
            select(Event)
            .where(Event.contact_id == uuid.UUID(str(contact_id)))
            .order_by(col(Event.occurred_at))
        )
        return list(rows.all())


async def test_segment_batches_round_trip_into_contacts_and_journeys(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    triggered = await journey(
        time_api,
        [{"id": "pause", "type": "wait", "duration": "1d"}],
        trigger={"event": "Trial Started"},
    )
    waiting = await journey(
        time_api,
        [
            {"id": "ready", "type": "wait_for", "event": "Plan Chosen"},
            {"id": "pause", "type": "wait", "duration": "1d"},
        ],
    )
    anonymous_id, user_id = unique("anon"), unique("user")
    email = f"{unique('ada')}@Example.com"
    visit = await post_batch(time_api, [{
        "type": "page", "anonymousId": anonymous_id, "messageId": unique("m"), "name": "Pricing",
        "context": {"page": {"path": "/pricing", "url": "https://example.com/pricing"}},
        "timestamp": "2026-03-01T10:00:00.000Z",
    }])  # fmt: skip
    assert visit.status_code == 200, visit.text
    assert visit.json()["success"] is True and visit.json()["contacts_created"] == 1
    visitor = await contact_by(settings, anonymous_id=anonymous_id)
    assert visitor.email is None and visitor.external_id is None

    batch = [
        {"type": "identify", "userId": user_id, "anonymousId": anonymous_id,
         "messageId": unique("m"), "traits": {"email": email, "firstName": "Ada", "plan": "pro"},
         "context": {"timezone": "Europe/Paris"}},
        {"type": "track", "userId": user_id, "event": "Trial Started", "messageId": unique("m"),
         "properties": {"plan": "pro"}, "timestamp": "2026-03-01T11:05:00+01:00",
         "someFieldSegmentAddsLater": {"x": 1}},
        {"type": "page", "userId": user_id, "messageId": unique("m"), "name": "Docs",
         "category": "help", "properties": {"path": "/docs"}},
    ]  # fmt: skip
    first = await post_batch(time_api, batch, sentAt="2026-03-01T10:06:00Z")
    assert first.status_code == 200, first.text
    assert first.json() == {
        "success": True, "received": 3, "stored": 2, "duplicates": 0,
        "contacts_created": 0, "merged": 0, "conflicts": [],
    }  # fmt: skip
    person = await contact_by(settings, external_id=user_id)
    assert person.id == visitor.id, "the anonymous visitor became the identified contact"
    assert person.email == email.lower() and person.anonymous_id == anonymous_id
    assert person.attributes == {"firstName": "Ada", "plan": "pro"}
    assert person.timezone == "Europe/Paris"
    stored = await events_of(settings, person.id)
    assert [(e.name, e.source) for e in stored] == [
        ("page_viewed", "segment"), ("Trial Started", "segment"), ("page_viewed", "segment"),
    ]  # fmt: skip
    assert stored[0].properties["page"] == "/pricing" and stored[0].properties["name"] == "Pricing"
    assert stored[1].occurred_at.isoformat() == "2026-03-01T10:05:00+00:00"
    assert stored[2].properties == {
        "name": "Docs", "category": "help", "path": "/docs", "page": "/docs",
    }  # fmt: skip
    runs = await enrollments_of(settings, triggered)
    assert [r.contact_id for r in runs] == [person.id]

    events_before = await count(settings, Event)
    again = await post_batch(time_api, batch)
    assert again.status_code == 200 and again.json()["duplicates"] == 2
    assert again.json()["stored"] == 0
    assert await count(settings, Event) == events_before
    assert len(await enrollments_of(settings, triggered)) == 1

    enrolled = (await enroll(time_api, waiting, str(person.id)))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "ready")
    chosen = {"type": "track", "userId": user_id, "event": "Plan Chosen", "messageId": unique("m")}
    assert (await post_batch(time_api, [chosen])).status_code == 200
    await wait_for_step(time_api, enrolled["id"], "pause")


async def test_segment_single_calls_accept_the_write_key_as_basic_auth(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    user_id, anonymous_id = unique("user"), unique("anon")
    auth = basic("test-api-key")
    calls = [
        ("identify", {"userId": user_id, "traits": {"phone": "+1 415 555 0100", "role": "CMO"}}),
        ("track", {"userId": user_id, "event": "Signed Up", "type": "ignored-by-path"}),
        ("screen", {"userId": user_id, "name": "Home"}),
        ("group", {"userId": user_id, "groupId": 42, "traits": {"name": "Acme"}}),
        ("page", {"anonymousId": anonymous_id, "properties": {"path": "/"}}),
        ("alias", {"userId": user_id, "previousId": anonymous_id}),
    ]
    for kind, body in calls:
        response = await time_api.post(f"/v1/{kind}", json=body, headers=auth)
        assert response.status_code == 200, (kind, response.text)
        assert response.json()["success"] is True
    person = await contact_by(settings, external_id=user_id)
    assert person.phone == "+14155550100" and person.attributes == {"role": "CMO"}
    names = [(e.name, e.properties) for e in await events_of(settings, person.id)]
    assert ("Signed Up", {}) in names
    assert ("screen_viewed", {"name": "Home", "category": None}) in names
    assert ("group_joined", {"group_id": "42", "traits": {"name": "Acme"}}) in names
    assert any(name == "page_viewed" for name, _ in names), "the aliased visitor's page moved"
    tombstone = await contact_by(settings, anonymous_id=anonymous_id, merged_into=person.id)
    assert tombstone.email is None

    wrong = await time_api.post("/v1/track", json=calls[1][1], headers=basic("nope"))
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
    bearer = await time_api.post("/v1/track", json=calls[1][1])
    assert bearer.status_code == 200


def _identify() -> dict[str, Any]:
    return {"type": "identify", "userId": unique("ok"), "traits": {"email": "ok@example.com"}}


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        ({"userId": "u1", "event": "x"}, "batch[1].type: Field required"),
        ({"type": "explode", "userId": "u1"}, "batch[1].type: unknown call type 'explode'"),
        ({"type": "track", "userId": "u1"}, "batch[1].event: Field required"),
        ({"type": "track", "event": "x"}, "batch[1]: userId or anonymousId is required"),
        (
            {"type": "identify", "userId": "u1", "traits": {"email": "nope"}},
            "batch[1].traits.email: invalid email address 'nope'",
        ),
        (
            {"type": "identify", "userId": "u1", "traits": {"phone": "12"}},
            "batch[1].traits.phone: invalid phone number",
        ),
        (
            {"type": "track", "userId": "u1", "event": "x", "timestamp": "yesterday"},
            "batch[1].timestamp: 'yesterday' is not an ISO 8601 date-time",
        ),
        (
            {"type": "track", "userId": "u1", "event": "x", "timestamp": 1767225600},
            "batch[1].timestamp: must be an ISO 8601 date-time string",
        ),
        ({"type": "track", "userId": ["u1"], "event": "x"}, "batch[1].userId"),
        ({"type": "track", "userId": "u1", "event": "x", "properties": [1]}, "batch[1].properties"),
        ({"type": "alias", "anonymousId": "a1", "previousId": "p"}, "batch[1]: userId is required"),
        ("track", "batch[1]: a call must be a JSON object"),
        (
            {"type": "track", "userId": "u1", "event": "x", "properties": {"a": "x" * 33_000}},
            "batch[1]: 33",
        ),
    ],
)
async def test_malformed_segment_batch_is_refused_whole(
    time_api: httpx.AsyncClient, settings: Settings, bad: Any, problem: str
) -> None:
    before = (await count(settings, Contact), await count(settings, Event))
    response = await post_batch(time_api, [_identify(), bad])
    assert response.status_code == 400, response.text
    assert problem in response.json()["detail"]
    assert (await count(settings, Contact), await count(settings, Event)) == before


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"batch": [{"type": "track", "userId": "u", "event": "x", "properties": {
            "a": "x" * 30_000}}] * 18}, "body is over 500 KB"),
        ({"calls": []}, "body.batch: Field required"),
        ({"batch": {}}, "body.batch"),
        ([], "body must be an object"),
    ],
)  # fmt: skip
async def test_malformed_segment_envelope_is_refused(
    time_api: httpx.AsyncClient, settings: Settings, body: Any, problem: str
) -> None:
    before = await count(settings, Event)
    response = await time_api.post("/v1/batch", json=body)
    assert response.status_code == 400, response.text
    assert problem in response.json()["detail"]
    assert await count(settings, Event) == before
    not_json = await time_api.post(
        "/v1/track", content=b"{", headers={"Content-Type": "text/plain"}
    )
    assert not_json.status_code == 400 and "body is not JSON" in not_json.json()["detail"]


async def test_anonymous_visitor_merges_into_an_existing_contact(
    time_env: WorkflowEnvironment,
    time_api: httpx.AsyncClient,
    time_worker: Worker,
    settings: Settings,
) -> None:
    user_id, anonymous_id = unique("user"), unique("anon")
    known = await contact(time_api, external_id=user_id, attributes={"plan": "pro"})
    visits = [
        {"type": "identify", "anonymousId": anonymous_id, "traits": {"plan": "free", "ref": "ad"}},
        {"type": "page", "anonymousId": anonymous_id, "properties": {"path": "/pricing"}},
        {"type": "track", "anonymousId": anonymous_id, "event": "Video Played"},
    ]
    assert (await post_batch(time_api, visits)).status_code == 200
    visitor = await contact_by(settings, anonymous_id=anonymous_id)
    assert visitor.id != uuid.UUID(known["id"]) and visitor.attributes == {
        "plan": "free",
        "ref": "ad",
    }
    held = await journey(time_api, [{"id": "ready", "type": "wait_for", "event": "never"}])
    enrolled = (await enroll(time_api, held, str(visitor.id)))["enrollment"]
    await wait_for_step(time_api, enrolled["id"], "ready")

    response = await post_batch(
        time_api, [{"type": "identify", "userId": user_id, "anonymousId": anonymous_id}]
    )
    assert response.status_code == 200 and response.json()["merged"] == 1

    person = await contact_by(settings, external_id=user_id)
    assert str(person.id) == known["id"]
    assert person.attributes == {"plan": "pro", "ref": "ad"}, "the identified contact's values win"
    assert person.anonymous_id == anonymous_id
    moved = await events_of(settings, person.id)
    assert sorted(e.name for e in moved) == ["Video Played", "page_viewed"]
    assert await events_of(settings, visitor.id) == []
    tombstone = await contact_by(settings, id=visitor.id)
    assert tombstone.merged_into == person.id and tombstone.anonymous_id == anonymous_id
    async with session_scope(settings.database_url) as session:
        ended = await session.get(Enrollment, uuid.UUID(enrolled["id"]))
    assert ended is not None and (ended.status, ended.exit_reason) == ("exited", "merged")
    described = await time_env.client.get_workflow_handle(ended.workflow_id).describe()
    assert described.status == WorkflowExecutionStatus.TERMINATED

    later = await post_batch(
        time_api, [{"type": "track", "anonymousId": anonymous_id, "event": "Came Back"}]
    )
    assert later.status_code == 200 and later.json()["contacts_created"] == 0
    assert "Came Back" in [e.name for e in await events_of(settings, person.id)]


async def test_identify_conflicting_email_keeps_user_id_and_reports_it(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    holder = await contact(time_api)
    user_id = unique("user")
    other = await contact(time_api, external_id=user_id)
    response = await post_batch(
        time_api, [{"type": "identify", "userId": user_id, "traits": {"email": holder["email"]}}]
    )
    assert response.status_code == 200
    assert "belongs to another contact" in response.json()["conflicts"][0]
    assert (await contact_by(settings, external_id=user_id)).email == other["email"]
    fresh = unique("user")
    adopted = await post_batch(
        time_api, [{"type": "identify", "userId": fresh, "traits": {"email": holder["email"]}}]
    )
    assert adopted.json()["conflicts"] == [], "an unclaimed userId joins the email's contact"
    assert str((await contact_by(settings, external_id=fresh)).id) == holder["id"]
