"""Contacts API: partial update and the filtered, paged list."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from models.db import session_scope
from models.tables import Contact, Segment, SegmentMember, utcnow
from settings import Settings
from tests.helpers import contact, unique


async def test_contact_patch_changes_only_given_fields(time_api: httpx.AsyncClient) -> None:
    person = await contact(
        time_api, phone="+14155550123", tags=["a"], attributes={"plan": "free", "seats": 3}
    )
    new_email = f"{unique('patched')}@Example.com"
    response = await time_api.patch(f"/v1/contacts/{person['id']}", json={
        "email": new_email, "timezone": "Europe/Paris", "lifecycle_stage": "mql",
        "attributes": {"plan": "pro", "seats": None, "role": "CMO"},
    })  # fmt: skip
    assert response.status_code == 200, response.text
    stored = response.json()
    assert stored["email"] == new_email.lower()
    assert stored["phone"] == "+14155550123" and stored["tags"] == ["a"]
    assert stored["timezone"] == "Europe/Paris" and stored["lifecycle_stage"] == "mql"
    assert stored["attributes"] == {"plan": "pro", "role": "CMO"}
    assert stored["score"] == person["score"]
    assert (await time_api.get(f"/v1/contacts/{person['id']}")).json() == stored

    cleared = await time_api.patch(f"/v1/contacts/{person['id']}", json={"phone": None})
    assert cleared.status_code == 200 and cleared.json()["phone"] is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"email": "not-an-email"}, "invalid email address"),
        ({"phone": "12"}, "invalid phone number"),
        ({"timezone": "Mars/Olympus"}, "unknown time zone"),
        ({"tags": None}, "tags cannot be null"),
        ({"score": 10}, "Extra inputs are not permitted"),
        ({"email": None}, "needs an email or an external_id"),
    ],
)
async def test_contact_patch_bad_input_changes_nothing(
    time_api: httpx.AsyncClient, body: dict[str, Any], problem: str
) -> None:
    person = await contact(time_api, phone="+14155550123")
    response = await time_api.patch(f"/v1/contacts/{person['id']}", json=body)
    assert response.status_code == 422 and problem in response.text
    assert (await time_api.get(f"/v1/contacts/{person['id']}")).json() == person


async def test_contact_patch_conflict_names_the_other_contact(time_api: httpx.AsyncClient) -> None:
    a = await contact(time_api, external_id=unique("crm"))
    b = await contact(time_api)
    taken_email = await time_api.patch(f"/v1/contacts/{b['id']}", json={"email": a["email"]})
    taken_ext = await time_api.patch(
        f"/v1/contacts/{b['id']}", json={"external_id": a["external_id"]}
    )
    for response, name in ((taken_email, "email"), (taken_ext, "external_id")):
        assert response.status_code == 409
        assert response.json()["detail"] == f"{name} {a[name]} belongs to contact {a['id']}"
    assert (await time_api.get(f"/v1/contacts/{b['id']}")).json() == b


async def test_contact_patch_unknown_or_erased_is_404(time_api: httpx.AsyncClient) -> None:
    missing = await time_api.patch(f"/v1/contacts/{uuid.uuid4()}", json={"tags": []})
    assert missing.status_code == 404 and "no contact with id" in missing.json()["detail"]
    person = await contact(time_api)
    assert (await time_api.delete(f"/v1/contacts/{person['id']}")).status_code == 200
    erased = await time_api.patch(f"/v1/contacts/{person['id']}", json={"tags": ["x"]})
    assert erased.status_code == 404


async def test_contact_list_filters_and_pages(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    tag = unique("cohort")
    people = [await contact(time_api, tags=[tag]) for _ in range(5)]
    await contact(time_api, tags=[tag], lifecycle_stage="customer")
    gone = await contact(time_api, tags=[tag])
    assert (await time_api.delete(f"/v1/contacts/{gone['id']}")).status_code == 200
    async with session_scope(settings.database_url) as session:
        merged = Contact(anonymous_id=unique("anon"), tags=[tag])
        session.add(merged)
        await session.flush()
        merged.merged_into = uuid.UUID(people[0]["id"])

    seen: list[str] = []
    after: str | None = None
    while True:
        params: dict[str, Any] = {"tag": tag, "lifecycle_stage": "subscriber", "limit": 2}
        if after:
            params["after"] = after
        page = (await time_api.get("/v1/contacts", params=params)).json()
        assert len(page["contacts"]) <= 2
        seen += [c["id"] for c in page["contacts"]]
        after = page["next"]
        if after is None:
            break
    assert seen == sorted(p["id"] for p in people)

    by_email = await time_api.get("/v1/contacts", params={"email": people[1]["email"].upper()})
    assert [c["id"] for c in by_email.json()["contacts"]] == [people[1]["id"]]


async def test_contact_list_by_segment(time_api: httpx.AsyncClient, settings: Settings) -> None:
    a, b = await contact(time_api), await contact(time_api)
    key = unique("vip")
    async with session_scope(settings.database_url) as session:
        segment = Segment(key=key, name="VIP", condition={"attr": "vip", "op": "eq", "value": 1})
        session.add(segment)
        await session.flush()
        session.add(SegmentMember(segment_id=segment.id, contact_id=uuid.UUID(b["id"])))
        segment.refreshed_at = utcnow()
    response = await time_api.get("/v1/contacts", params={"segment": key})
    assert response.status_code == 200, response.text
    # a is not a member, so it is not listed.
    assert [c["id"] for c in response.json()["contacts"]] == [b["id"]]
    assert a["id"] not in {c["id"] for c in response.json()["contacts"]}


@pytest.mark.parametrize(
    ("params", "status", "problem"),
    [
        ({"segment": "no-such-segment"}, 404, "no segment with key 'no-such-segment'"),
        ({"after": "not a cursor!"}, 400, "invalid cursor"),
        ({"limit": 0}, 422, "greater than or equal to 1"),
        ({"limit": 1001}, 422, "less than or equal to 1000"),
    ],
)
async def test_contact_list_bad_query_is_refused(
    time_api: httpx.AsyncClient, params: dict[str, Any], status: int, problem: str
) -> None:
    response = await time_api.get("/v1/contacts", params=params)
    assert response.status_code == status and problem in response.text
