"""Website form fills: posted without a key, they upsert the contact and record a
``form_submitted`` event once per submission."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
from sqlmodel import select

from models.db import session_scope
from models.tables import Contact, Event
from settings import Settings
from tests.helpers import unique
from tests.test_api import count

NO_KEY = {"Authorization": ""}


async def stored(settings: Settings, event_id: str) -> tuple[Event, Contact]:
    async with session_scope(settings.database_url) as session:
        event = await session.get(Event, uuid.UUID(event_id))
        assert event is not None and event.contact_id is not None
        person = await session.get(Contact, event.contact_id)
        assert person is not None
        return event, person


async def test_form_fill_urlencoded_upserts_the_contact_and_records_the_event(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    email = f"{unique('form')}@Example.COM"
    response = await time_api.post(
        "/webhooks/forms/demo-request",
        data={
            "email": email,
            "phone": "+44 20 7946 0958",
            "company": "Acme",
            "first_name": "Ada",
            "_hp": "",
            "_utm": "not stored",
        },
        headers=NO_KEY,
    )
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["duplicate"] is False
    event, person = await stored(settings, body["event_id"])
    assert str(person.id) == body["contact_id"]
    assert person.email == email.lower() and person.phone == "+442079460958"
    assert person.attributes == {"company": "Acme", "first_name": "Ada"}
    assert (event.name, event.source) == ("form_submitted", "form")
    assert event.properties == {"form": "demo-request", "company": "Acme", "first_name": "Ada"}

    again = await time_api.post(
        "/webhooks/forms/newsletter", json={"email": email, "company": "Acme Ltd", "seats": 5}
    )
    assert again.status_code == 202, again.text
    assert again.json()["contact_id"] == body["contact_id"]
    _, person = await stored(settings, again.json()["event_id"])
    assert person.attributes == {"company": "Acme Ltd", "first_name": "Ada", "seats": 5}


async def test_form_fill_multipart_keeps_text_fields(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    response = await time_api.post(
        "/webhooks/forms/contact-us",
        data={"email": f"{unique('mp')}@example.com", "message": "Hello", "topics": ["a", "b"]},
        files={"cv": ("cv.txt", b"a file", "text/plain")},
    )
    assert response.status_code == 202, response.text
    event, person = await stored(settings, response.json()["event_id"])
    assert person.attributes == {"message": "Hello", "topics": ["a", "b"]}
    assert "cv" not in event.properties


async def test_form_fill_is_stored_once_per_idempotency_key(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    key = unique("sub")
    fill = {"email": f"{unique('dup')}@example.com", "plan": "pro"}
    first = await time_api.post(
        "/webhooks/forms/signup", data=fill, headers={"Idempotency-Key": key}
    )
    second = await time_api.post(
        "/webhooks/forms/signup", data=fill, headers={"Idempotency-Key": key}
    )
    assert first.status_code == 202 and second.status_code == 200
    assert second.json()["duplicate"] is True
    assert second.json()["event_id"] == first.json()["event_id"]
    by_field = {**fill, "_submission_id": unique("sid")}
    third = await time_api.post("/webhooks/forms/signup", data=by_field)
    fourth = await time_api.post("/webhooks/forms/signup", data=by_field)
    assert fourth.json() == {**third.json(), "duplicate": True}
    async with session_scope(settings.database_url) as session:
        rows = (
            await session.exec(select(Event).where(Event.idempotency_id == f"form:signup:{key}"))
        ).all()
    assert len(rows) == 1


@pytest.mark.parametrize(
    ("form", "kwargs", "status", "problem"),
    [
        ("demo", {"data": {"email": "not-an-email"}}, 422, "email: invalid email address"),
        ("demo", {"data": {"name": "Ada"}}, 422, "email: field required"),
        ("demo", {"json": {"email": ["a@example.com"]}}, 422, "email: must be one string"),
        ("demo", {"data": {"email": "a@example.com", "phone": "12"}}, 422, "phone: invalid"),
        ("demo", {"json": ["a@example.com"]}, 422, "body: must be an object"),
        ("demo", {"data": {"email": "a@example.com", "x": "y" * 70_000}}, 413, "at most 64 KB"),
        ("demo", {"content": b"email=a@example.com"}, 415, "application/x-www-form-urlencoded"),
        ("Bad_Form", {"data": {"email": "a@example.com"}}, 404, "no form"),
        ("x" * 65, {"data": {"email": "a@example.com"}}, 404, "no form"),
    ],
)
async def test_bad_form_fill_is_refused_and_stores_nothing(
    time_api: httpx.AsyncClient,
    settings: Settings,
    form: str,
    kwargs: dict[str, Any],
    status: int,
    problem: str,
) -> None:
    before = (await count(settings, Contact), await count(settings, Event))
    response = await time_api.post(f"/webhooks/forms/{form}", **kwargs)
    assert response.status_code == status, response.text
    assert problem in response.json()["detail"]
    assert (await count(settings, Contact), await count(settings, Event)) == before


async def test_honeypot_fill_is_dropped_silently(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    before = (await count(settings, Contact), await count(settings, Event))
    response = await time_api.post(
        "/webhooks/forms/demo", data={"email": "bot@example.com", "_hp": "http://spam"}
    )
    assert response.status_code == 200
    assert response.json() == {"contact_id": None, "event_id": None, "duplicate": False}
    assert (await count(settings, Contact), await count(settings, Event)) == before


async def test_form_fill_merges_the_anonymous_visitor(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    anonymous_id = unique("anon")
    visit = {"type": "page", "anonymousId": anonymous_id, "properties": {"path": "/pricing"}}
    assert (await time_api.post("/v1/batch", json={"batch": [visit]})).status_code == 200
    email = f"{unique('visitor')}@example.com"
    response = await time_api.post(
        "/webhooks/forms/demo", data={"email": email, "_anonymous_id": anonymous_id}
    )
    assert response.status_code == 202, response.text
    async with session_scope(settings.database_url) as session:
        names = (
            await session.exec(
                select(Event.name).where(
                    Event.contact_id == uuid.UUID(response.json()["contact_id"])
                )
            )
        ).all()
    assert sorted(names) == ["form_submitted", "page_viewed"]
