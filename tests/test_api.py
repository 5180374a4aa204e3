"""REST API: happy paths, and bad input that gets a clear 4xx and stores nothing."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import func
from sqlmodel import select

from models.db import session_scope
from models.tables import Contact, Enrollment, Event, Journey, JourneyVersion, Template
from settings import Settings
from tests.helpers import contact, publish, put_template, unique


async def count(settings: Settings, table: Any) -> int:
    async with session_scope(settings.database_url) as session:
        return int((await session.exec(select(func.count()).select_from(table))).one())


def journey_doc(key: str, template: str, **extra: Any) -> dict[str, Any]:
    return {
        "key": key,
        "name": "Welcome",
        "steps": [
            {"id": "hello", "type": "email", "template": template},
            {"id": "pause", "type": "wait", "duration": "2d"},
        ],
        **extra,
    }


async def test_api_requires_a_key(time_api: httpx.AsyncClient) -> None:
    missing = await time_api.get("/v1/journeys", headers={"Authorization": ""})
    wrong = await time_api.get("/v1/journeys", headers={"Authorization": "Bearer nope"})
    header = await time_api.get(
        "/v1/journeys", headers={"Authorization": "", "X-API-Key": "test-api-key"}
    )
    assert missing.status_code == 401 and "missing API key" in missing.json()["detail"]
    assert wrong.status_code == 401 and wrong.json()["detail"] == "invalid API key"
    assert header.status_code == 200


async def test_healthz_answers_without_a_key(time_api: httpx.AsyncClient) -> None:
    response = await time_api.get("/healthz", headers={"Authorization": ""})
    assert response.json() == {"status": "ok"}


async def test_contact_upsert_merges_attributes(time_api: httpx.AsyncClient) -> None:
    email = f"{unique('merge')}@Example.COM"
    first = await time_api.post("/v1/contacts", json={
        "email": email, "phone": "+1 (415) 555-0123", "attributes": {"plan": "free", "seats": 3},
    })  # fmt: skip
    second = await time_api.post("/v1/contacts", json={
        "email": email.lower(), "timezone": "Europe/Paris",
        "attributes": {"plan": "pro", "seats": None},
    })  # fmt: skip
    assert first.status_code == 201 and second.status_code == 200
    stored = second.json()["contact"]
    assert stored["id"] == first.json()["contact"]["id"]
    assert stored["email"] == email.lower()
    assert stored["phone"] == "+14155550123"
    assert stored["timezone"] == "Europe/Paris"
    assert stored["attributes"] == {"plan": "pro"}
    fetched = await time_api.get(f"/v1/contacts/{stored['id']}")
    assert fetched.json() == stored


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"attributes": {"a": 1}}, "needs an email or an external_id"),
        ({"email": "not-an-email"}, "invalid email address"),
        ({"email": "x@example.com", "phone": "12"}, "invalid phone number"),
        ({"email": "x@example.com", "timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"email": "x@example.com", "colour": "red"}, "Extra inputs are not permitted"),
    ],
)
async def test_contact_bad_input_is_refused(
    time_api: httpx.AsyncClient, settings: Settings, body: dict[str, Any], problem: str
) -> None:
    before = await count(settings, Contact)
    response = await time_api.post("/v1/contacts", json=body)
    assert response.status_code == 422
    assert problem in response.text
    assert await count(settings, Contact) == before


async def test_contact_conflicting_identities_are_refused(time_api: httpx.AsyncClient) -> None:
    a = await contact(time_api, external_id=unique("crm"))
    b = await contact(time_api)
    response = await time_api.post(
        "/v1/contacts", json={"email": b["email"], "external_id": a["external_id"]}
    )
    assert (
        response.status_code == 409 and "belong to different contacts" in response.json()["detail"]
    )
    assert (await time_api.get(f"/v1/contacts/{b['id']}")).json()["external_id"] is None


async def test_unknown_contact_is_404(time_api: httpx.AsyncClient) -> None:
    response = await time_api.get(f"/v1/contacts/{uuid.uuid4()}")
    assert response.status_code == 404 and "no contact with id" in response.json()["detail"]


async def test_template_is_checked_at_save(time_api: httpx.AsyncClient, settings: Settings) -> None:
    key = unique("broken")
    response = await time_api.put(f"/v1/templates/{key}", json={
        "channel": "email", "subject": "Hi", "html": "<p>{{ contact.first_name </p>",
    })  # fmt: skip
    assert response.status_code == 422
    assert "html: line 1" in response.json()["detail"]
    assert (await time_api.get(f"/v1/templates/{key}")).status_code == 404
    no_subject = await time_api.put(f"/v1/templates/{key}", json={"channel": "email", "html": "x"})
    assert no_subject.status_code == 422 and "needs a subject" in no_subject.text
    bad_key = await time_api.put("/v1/templates/Bad_Key", json={"channel": "sms", "text": "x"})
    assert bad_key.status_code == 422


async def test_journey_accepts_yaml_and_publishes_immutable_versions(
    time_api: httpx.AsyncClient,
) -> None:
    template = unique("tpl")
    await put_template(time_api, template)
    key = unique("yaml")
    yaml_doc = f"""
key: {key}
name: From YAML
steps:
  - {{id: hello, type: email, template: {template}}}
"""
    created = await time_api.post(
        "/v1/journeys", content=yaml_doc, headers={"Content-Type": "application/yaml"}
    )
    assert created.status_code == 201, created.text
    assert created.json()["status"] == "draft"
    v1 = await time_api.post(f"/v1/journeys/{key}/publish")
    assert v1.json()["version"] == 1
    changed = journey_doc(key, template, name="Changed")
    assert (await time_api.put(f"/v1/journeys/{key}", json=changed)).status_code == 200
    v2 = await time_api.post(f"/v1/journeys/{key}/publish")
    assert v2.json()["version"] == 2
    first = await time_api.get(f"/v1/journeys/{key}/versions/1")
    assert first.json()["document"]["name"] == "From YAML"
    journey = (await time_api.get(f"/v1/journeys/{key}")).json()
    assert journey["current_version"] == 2 and journey["status"] == "active"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            lambda d: d["steps"][1].update(duration="3 fortnights"),
            "steps[1] (id 'pause') duration: invalid duration",
        ),
        (
            lambda d: d["steps"].append({"id": "x", "type": "teleport"}),
            "steps[2] (id 'x'): unknown step type",
        ),
        (
            lambda d: d["steps"][0].update(colour="red"),
            "steps[0] (id 'hello') colour: unknown field",
        ),
        (
            lambda d: d["steps"].append(
                {"id": "w", "type": "wait_for", "event": "e", "on_event": "nowhere"}
            ),
            "step 'w': goes to unknown step 'nowhere'",
        ),
        (
            lambda d: d["steps"].append({"id": "hello", "type": "exit"}),
            "step 'hello': id is used by another step",
        ),
        (
            lambda d: d["steps"].append(
                {
                    "id": "b",
                    "type": "branch",
                    "cases": [
                        {"if": {"attr": "role", "op": "in", "value": "CMO"}, "goto": "hello"}
                    ],
                }
            ),
            "steps[2] (id 'b') cases.0.if.attr: operator 'in' needs a list value",
        ),
        (
            lambda d: d["steps"].append(
                {"id": "b", "type": "branch", "cases": [{"if": {"colour": "red"}, "goto": "hello"}]}
            ),
            "a condition needs one of",
        ),
        (lambda d: d.update(key="Not A Key"), "key: String should match pattern"),
        (lambda d: d.update(default_timezone="Atlantis/Capital"), "unknown time zone"),
        (lambda d: d.update(steps=[]), "steps: List should have at least 1 item"),
    ],
)
async def test_invalid_journey_names_step_and_field(
    time_api: httpx.AsyncClient, settings: Settings, mutate: Any, expected: str
) -> None:
    document = journey_doc(unique("bad"), "any-template")
    mutate(document)
    before = await count(settings, Journey)
    response = await time_api.post("/v1/journeys", json=document)
    assert response.status_code == 422, response.text
    messages = [e["message"] for e in response.json()["detail"]["errors"]]
    assert any(expected in m for m in messages), messages
    assert await count(settings, Journey) == before


async def test_malformed_journey_bodies_are_refused(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    before = await count(settings, Journey)
    not_json = await time_api.post(
        "/v1/journeys", content=b"{nope", headers={"Content-Type": "application/json"}
    )
    not_yaml = await time_api.post(
        "/v1/journeys", content=b"key: [", headers={"Content-Type": "application/yaml"}
    )
    a_list = await time_api.post("/v1/journeys", json=[1, 2])
    xml = await time_api.post(
        "/v1/journeys", content=b"<journey/>", headers={"Content-Type": "application/xml"}
    )
    assert not_json.status_code == 400 and "not valid application/json" in not_json.text
    assert not_yaml.status_code == 400 and "not valid application/yaml" in not_yaml.text
    assert a_list.status_code == 422 and "must be an object" in a_list.text
    assert xml.status_code == 415
    nan = (
        b'{"key": "nan", "name": "n", "steps": [{"id": "b", "type": "branch", '
        b'"cases": [{"if": {"attr": "a", "value": NaN}, "goto": "b"}], "else": "b"}]}'
    )
    for body, kind in ((nan, "application/json"), (b"key: x\nn: .nan\n", "application/yaml")):
        refused = await time_api.post("/v1/journeys", content=body, headers={"Content-Type": kind})
        assert refused.status_code == 400 and "NaN and Infinity" in refused.text, refused.text
    assert await count(settings, Journey) == before


async def test_publishing_with_a_missing_template_names_the_step(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    key = unique("missing-template")
    assert (
        await time_api.post("/v1/journeys", json=journey_doc(key, "no-such-template"))
    ).status_code == 201
    versions_before = await count(settings, JourneyVersion)
    response = await time_api.post(f"/v1/journeys/{key}/publish")
    assert response.status_code == 422
    assert response.json()["detail"]["errors"][0]["message"] == (
        "step 'hello' template: no template with key 'no-such-template'"
    )
    assert await count(settings, JourneyVersion) == versions_before
    assert (await time_api.get(f"/v1/journeys/{key}")).json()["status"] == "draft"


async def test_journey_key_conflicts_and_mismatches(time_api: httpx.AsyncClient) -> None:
    template = unique("tpl")
    await put_template(time_api, template)
    key = unique("dup")
    await publish(time_api, journey_doc(key, template))
    again = await time_api.post("/v1/journeys", json=journey_doc(key, template, name="Other"))
    assert again.status_code == 409
    mismatch = await time_api.put(
        f"/v1/journeys/{key}", json=journey_doc(unique("other"), template)
    )
    assert mismatch.status_code == 422 and "does not match the URL" in mismatch.text
    assert (await time_api.get(f"/v1/journeys/{key}")).json()["name"] == "Welcome"
    assert (await time_api.get("/v1/journeys/no-such-journey")).status_code == 404


async def test_enrollment_bad_input(time_api: httpx.AsyncClient, settings: Settings) -> None:
    template = unique("tpl")
    await put_template(time_api, template)
    key = unique("enroll")
    await publish(time_api, journey_doc(key, template))
    draft_key = unique("draft")
    await time_api.post("/v1/journeys", json=journey_doc(draft_key, template))
    person = await contact(time_api)
    before = await count(settings, Enrollment)

    unknown_contact = await time_api.post(
        f"/v1/journeys/{key}/enrollments", json={"contact_id": str(uuid.uuid4())}
    )
    unknown_email = await time_api.post(
        f"/v1/journeys/{key}/enrollments", json={"email": "nobody@example.com"}
    )
    unknown_journey = await time_api.post(
        "/v1/journeys/nope/enrollments", json={"contact_id": person["id"]}
    )
    draft = await time_api.post(
        f"/v1/journeys/{draft_key}/enrollments", json={"contact_id": person["id"]}
    )
    two_refs = await time_api.post(
        f"/v1/journeys/{key}/enrollments",
        json={"contact_id": person["id"], "email": person["email"]},
    )
    assert unknown_contact.status_code == 404 and "no contact with id" in unknown_contact.text
    assert unknown_email.status_code == 404 and "nobody@example.com" in unknown_email.text
    assert (
        unknown_journey.status_code == 404 and "no journey with key 'nope'" in unknown_journey.text
    )
    assert draft.status_code == 409 and "publish it before enrolling" in draft.text
    assert two_refs.status_code == 422 and "exactly one of" in two_refs.text
    assert await count(settings, Enrollment) == before
    assert (await time_api.get(f"/v1/enrollments/{uuid.uuid4()}")).status_code == 404


async def test_event_is_stored_once_per_idempotency_id(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    person = await contact(time_api)
    body = {
        "id": unique("evt"),
        "email": person["email"],
        "name": "page_viewed",
        "properties": {"page": "/pricing"},
    }
    first = await time_api.post("/v1/events", json=body)
    second = await time_api.post("/v1/events", json={**body, "properties": {"page": "/other"}})
    assert first.status_code == 202 and first.json()["duplicate"] is False
    assert second.status_code == 200 and second.json()["duplicate"] is True
    assert first.json()["event_id"] == second.json()["event_id"]
    async with session_scope(settings.database_url) as session:
        stored = (await session.exec(select(Event).where(Event.idempotency_id == body["id"]))).all()
    assert len(stored) == 1 and stored[0].properties == {"page": "/pricing"}


@pytest.mark.parametrize(
    ("body", "status", "problem"),
    [
        ({"name": "opened"}, 422, "name the contact by exactly one of"),
        (
            {"email": "ghost@example.com", "name": "opened"},
            404,
            "no contact with email ghost@example.com",
        ),
        ({"email": "{email}", "name": "has spaces"}, 422, "String should match pattern"),
        ({"email": "{email}"}, 422, "Field required"),
        ({"email": "{email}", "name": "x", "properties": [1]}, 422, "valid dictionary"),
        (
            {"email": "{email}", "name": "x", "occurred_at": "2026-01-01T10:00:00"},
            422,
            "time zone offset",
        ),
        ({"email": "{email}", "name": "x", "occurred_at": "yesterday"}, 422, "occurred_at"),
    ],
)
async def test_malformed_event_is_refused(
    time_api: httpx.AsyncClient, settings: Settings, body: dict[str, Any], status: int, problem: str
) -> None:
    person = await contact(time_api)
    if body.get("email") == "{email}":
        body = {**body, "email": person["email"]}
    before = await count(settings, Event)
    response = await time_api.post("/v1/events", json=body)
    assert response.status_code == status, response.text
    assert problem in response.text
    assert await count(settings, Event) == before


async def test_template_round_trip(time_api: httpx.AsyncClient, settings: Settings) -> None:
    key = unique("round")
    before = await count(settings, Template)
    created = await time_api.put(
        f"/v1/templates/{key}", json={"channel": "sms", "text": "Hi {{ contact.first_name }}"}
    )
    updated = await time_api.put(f"/v1/templates/{key}", json={"channel": "sms", "text": "Hello"})
    assert created.status_code == 201 and updated.status_code == 200
    assert (await time_api.get(f"/v1/templates/{key}")).json()["text"] == "Hello"
    assert await count(settings, Template) == before + 1
    assert any(t["key"] == key for t in (await time_api.get("/v1/templates")).json())


async def test_api_refuses_to_start_without_a_key(settings: Settings) -> None:
    from api.main import create_app

    app = create_app(settings.model_copy(update={"api_key": None}))
    with pytest.raises(RuntimeError, match="NURTURE_API_KEY is not set"):
        async with app.router.lifespan_context(app):
            pass


@pytest.mark.parametrize(
    ("step", "expected"),
    [
        ({"type": "wait"}, "a wait needs exactly one of duration, until"),
        ({"type": "wait", "duration": "1d", "until": {"time": "09:00"}}, "exactly one of duration"),
        ({"type": "wait", "until": {"time": "25:00"}}, "until.time.time"),
        ({"type": "wait", "until": {"time": "09:00", "weekdays": []}}, "weekdays may not be empty"),
        ({"type": "wait", "until": {"time": "09:00", "weekdays": ["funday"]}}, "funday"),
        ({"type": "wait", "until": {"at": "next tuesday"}}, "until.at.at"),
        ({"type": "wait", "until": {"attr": "birthday", "prop": "x"}}, "exactly one of attr, prop"),
        ({"type": "wait", "until": {"attr": "birthday", "offset": "-1y"}}, "invalid duration"),
        ({"type": "wait", "until": {"colour": "red"}}, "until needs one of"),
        (
            {"type": "email", "template": "t", "window": {"from": "09:00"}},
            "window.to: Field required",
        ),
        ({"type": "email", "template": "t", "window": {"from": "09:00", "to": "09:00"}}, "window"),
        (
            {"type": "sms", "template": "t", "window": {"from": "9", "to": "10:00"}},
            "window.from",
        ),
        ({"type": "sms"}, "template: Field required"),
        ({"type": "wait_for"}, "exactly one of event, condition"),
        (
            {"type": "wait_for", "condition": {"score_gte": 1}, "where": {"prop": "a", "value": 1}},
            "where filters an event",
        ),
        ({"type": "wait_for", "event": "e", "on_timeout": "first"}, "on_timeout needs a timeout"),
        (
            {"type": "wait_for", "event": "e", "where": {"attr": "role", "value": "x"}},
            "where may only test event properties",
        ),
        ({"type": "branch", "cases": []}, "cases: List should have at least 1 item"),
        ({"type": "split", "variants": [{"weight": 1, "goto": "first"}]}, "at least 2 items"),
        (
            {
                "type": "split",
                "variants": [{"weight": 0, "goto": "first"}, {"weight": 1, "goto": "first"}],
            },
            "variants.0.weight",
        ),
        (
            {
                "type": "split",
                "variants": [{"weight": 1, "goto": "first"}, {"weight": 1, "goto": "first"}],
            },
            "distinct names",
        ),
        ({"type": "update_contact"}, "update_contact needs set"),
        ({"type": "update_contact", "set": {"email": "x@y.z"}}, "set may not change email"),
        ({"type": "crm", "action": "create_task"}, "create_task needs a note"),
        ({"type": "crm", "action": "call_them"}, "action: Input should be"),
        ({"type": "webhook", "url": "ftp://example.com"}, "url: String should match pattern"),
        ({"type": "webhook", "url": "https://example.com", "method": "TRACE"}, "method"),
        ({"type": "enroll"}, "journey: Field required"),
        ({"type": "goto"}, "step: Field required"),
        ({"type": "goto", "step": "nowhere"}, "goes to unknown step 'nowhere'"),
    ],
)
async def test_every_step_type_refuses_bad_definitions(
    time_api: httpx.AsyncClient, settings: Settings, step: dict[str, Any], expected: str
) -> None:
    document = {
        "key": unique("bad-step"),
        "name": "Bad",
        "steps": [{"id": "first", "type": "exit"}, {"id": "broken", **step}],
    }
    before = await count(settings, Journey)
    response = await time_api.post("/v1/journeys", json=document)
    assert response.status_code == 422, response.text
    messages = [e["message"] for e in response.json()["detail"]["errors"]]
    assert any(expected in m for m in messages), messages
    named = [e for e in response.json()["detail"]["errors"] if e["step"] == "broken"]
    assert named or any("'broken'" in m for m in messages), messages
    assert await count(settings, Journey) == before


@pytest.mark.parametrize(
    ("top", "expected"),
    [
        (
            {"trigger": {"where": {"prop": "a", "value": 1}}},
            "a trigger needs an event or a segment",
        ),
        ({"trigger": {"segment": "trial", "event": "x"}}, "a segment trigger takes no event"),
        ({"trigger": {"segment": "Trial Users"}}, "should match pattern"),
        (
            {"trigger": {"event": "x", "where": {"attr": "a", "value": 1}}},
            "trigger: where may only",
        ),
        ({"enroll_on_publish": True}, "enroll_on_publish needs a segment trigger"),
        ({"reentry": "sometimes"}, "reentry"),
        ({"reentry": {"after": "soon"}}, "invalid duration"),
        ({"exit_when": {"event": "x", "within": "forever"}}, "invalid duration"),
        ({"exit_when": {"event": "x", "count_gte": -1}}, "count_gte"),
    ],
)
async def test_journey_level_fields_refuse_bad_definitions(
    time_api: httpx.AsyncClient, top: dict[str, Any], expected: str
) -> None:
    document = {
        "key": unique("bad-top"),
        "name": "Bad",
        "steps": [{"id": "x", "type": "exit"}],
        **top,
    }
    response = await time_api.post("/v1/journeys", json=document)
    assert response.status_code == 422, response.text
    messages = [e["message"] for e in response.json()["detail"]["errors"]]
    assert any(expected in m for m in messages), messages


async def test_publish_checks_template_channels_and_enroll_targets(
    time_api: httpx.AsyncClient,
) -> None:
    email_template = unique("mail")
    await put_template(time_api, email_template)
    key = unique("channels")
    document = {
        "key": key,
        "name": "Channels",
        "steps": [
            {"id": "text", "type": "sms", "template": email_template},
            {"id": "handover", "type": "enroll", "journey": "no-such-journey"},
        ],
    }
    assert (await time_api.post("/v1/journeys", json=document)).status_code == 201
    response = await time_api.post(f"/v1/journeys/{key}/publish")
    assert response.status_code == 422
    messages = [e["message"] for e in response.json()["detail"]["errors"]]
    assert messages == [
        f"step 'text' template: template {email_template!r} is for email, not sms",
        "step 'handover' journey: no journey with key 'no-such-journey'",
    ]


async def test_journey_status_changes_need_a_sensible_state(time_api: httpx.AsyncClient) -> None:
    key = unique("status")
    await time_api.post(
        "/v1/journeys", json={"key": key, "name": "S", "steps": [{"id": "x", "type": "exit"}]}
    )
    draft_pause = await time_api.post(f"/v1/journeys/{key}/pause")
    assert draft_pause.status_code == 409 and "is draft" in draft_pause.text
    assert (await time_api.post("/v1/journeys/nope/stop")).status_code == 404


async def test_template_preview_renders_for_a_chosen_contact(time_api: httpx.AsyncClient) -> None:
    key = unique("preview")
    await time_api.put(
        f"/v1/templates/{key}",
        json={
            "channel": "email",
            "subject": "{{ contact.first_name | default('Hi') }}, "
            "about {{ trigger.properties.plan }}",
            "html": "<p>{{ contact.company }}</p>",
            "text": "Hello {{ contact.first_name }}",
        },
    )
    ada = await contact(time_api, attributes={"first_name": "Ada", "company": "<Acme & Co>"})
    shown = await time_api.post(
        f"/v1/templates/{key}/preview",
        json={"contact_id": ada["id"], "trigger": {"properties": {"plan": "pro"}}},
    )
    assert shown.status_code == 200, shown.text
    assert shown.json() == {
        "channel": "email",
        "subject": "Ada, about pro",
        "html": "<p>&lt;Acme &amp; Co&gt;</p>",
        "text": "Hello Ada",
    }
    bare = await contact(time_api)
    fallback = (
        await time_api.post(f"/v1/templates/{key}/preview", json={"email": bare["email"]})
    ).json()
    assert fallback["subject"] == "Hi, about" and fallback["text"] == "Hello "
    missing = await time_api.post(
        f"/v1/templates/{key}/preview", json={"email": "nobody@example.com"}
    )
    assert missing.status_code == 404
    unknown = await time_api.post("/v1/templates/no-such/preview", json={"contact_id": ada["id"]})
    assert unknown.status_code == 404 and "no template with key" in unknown.text
    escape = unique("escape")
    await time_api.put(
        f"/v1/templates/{escape}",
        json={"channel": "sms", "text": "{% set x = contact.update({'a': 1}) %}hi"},
    )
    refused = await time_api.post(f"/v1/templates/{escape}/preview", json={"contact_id": ada["id"]})
    assert refused.status_code == 422 and "failed to render" in refused.text
