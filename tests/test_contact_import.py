"""Bulk contact import: CSV, JSON and NDJSON, per-row errors, limits, and a 100k-row load."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func
from sqlmodel import col, select
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from models.db import session_scope
from models.tables import Contact
from settings import Settings
from tests.helpers import contact, unique

CSV = {"Content-Type": "text/csv"}


async def count_contacts(settings: Settings) -> int:
    async with session_scope(settings.database_url) as session:
        return int((await session.exec(select(func.count()).select_from(Contact))).one())


async def by_email(settings: Settings, email: str) -> Contact | None:
    async with session_scope(settings.database_url) as session:
        return (await session.exec(select(Contact).where(Contact.email == email))).first()


async def test_import_100k_csv_rows_in_one_request(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    run = unique("bulk")
    lines = ["email,external_id,phone,timezone,lifecycle_stage,tags,plan"]
    lines += [
        f"{run}-{i}@example.com,{run}-{i},+1415555{i % 10000:04d},Europe/Paris,lead,a;b,pro"
        for i in range(100_000)
    ]
    body = ("\n".join(lines) + "\n").encode()
    before = await count_contacts(settings)

    started = time.perf_counter()
    response = await time_api.post("/v1/contacts/import", content=body, headers=CSV, timeout=300)
    elapsed = time.perf_counter() - started

    print(f"\n100,000-row CSV import ({len(body) / 1e6:.1f} MB): {elapsed:.1f} s")
    assert response.status_code == 200, response.text
    assert response.json() == {
        "received": 100_000, "created": 100_000, "updated": 0, "rejected": 0, "errors": [],
    }  # fmt: skip
    assert await count_contacts(settings) == before + 100_000
    stored = await by_email(settings, f"{run}-77@example.com")
    assert stored is not None
    assert (stored.external_id, stored.phone, stored.timezone) == (
        f"{run}-77",
        "+14155550077",
        "Europe/Paris",
    )
    assert stored.tags == ["a", "b"] and stored.attributes == {"plan": "pro"}
    assert stored.lifecycle_stage == "lead"


async def test_import_reports_invalid_rows_and_stores_the_rest(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    run = unique("mixed")
    old = await contact(time_api, email=f"{run}-old@example.com", attributes={"keep": 1, "x": 1})
    other = await contact(time_api, external_id=f"{run}-crm")
    body = "\n".join([
        "email,external_id,phone,timezone,x",
        f"{run}-new@example.com,,,,",           # 1 created
        f"{run}-OLD@example.com,,+1 415 555 0100,,2",  # 2 updates old
        "not-an-email,,,,",                     # 3
        ",,+14155550101,,",                     # 4
        f"{run}-tz@example.com,,,Mars/Olympus,",  # 5
        f"{run}-new@example.com,,,,",           # 6 duplicate of 1
        f"{run}-old@example.com,,,,",           # 7 duplicate of 2
        f"{old['email']}x,{run}-crm,,,",        # 8 would move other's external id: updates other
        f"{run}-ph@example.com,,12,,",          # 9
        "",
    ])  # fmt: skip
    response = await time_api.post("/v1/contacts/import", content=body, headers=CSV)
    assert response.status_code == 200, response.text
    result = response.json()
    assert (result["received"], result["created"], result["updated"], result["rejected"]) == (
        9, 1, 2, 6,
    )  # fmt: skip
    errors = {e["row"]: e["error"] for e in result["errors"]}
    assert sorted(errors) == [3, 4, 5, 6, 7, 9]
    assert "invalid email address" in errors[3]
    assert "needs an email or an external_id" in errors[4]
    assert "unknown time zone" in errors[5]
    assert errors[6] == f"duplicate email {run}-new@example.com (first in row 1)"
    assert "invalid phone number" in errors[9]
    updated = await by_email(settings, old["email"])
    assert updated is not None
    assert updated.phone == "+14155550100" and updated.attributes == {"keep": 1, "x": "2"}
    moved = await by_email(settings, f"{old['email']}x")
    assert moved is not None and str(moved.id) == other["id"]


async def test_import_refuses_a_row_naming_two_contacts(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    a = await contact(time_api)
    b = await contact(time_api, external_id=unique("crm"))
    rows = [{"email": a["email"], "external_id": b["external_id"], "tags": ["x"]}]
    response = await time_api.post("/v1/contacts/import", json=rows)
    assert response.json()["rejected"] == 1
    [error] = response.json()["errors"]
    assert error == {
        "row": 1,
        "error": f"email {a['email']} belongs to contact {a['id']} "
        f"and external_id {b['external_id']} to contact {b['id']}",
    }
    assert (await time_api.get(f"/v1/contacts/{a['id']}")).json()["tags"] == []


async def test_import_json_and_ndjson_merge_like_the_upsert(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    run = unique("json")
    old = await contact(time_api, external_id=f"{run}-1", attributes={"a": 1, "b": 2})
    rows: list[dict[str, Any]] = [
        {"external_id": f"{run}-1", "attributes": {"b": None, "c": 3}, "tags": ["t"]},
        {"email": f"{run}-2@example.com", "lifecycle_stage": "customer"},
        {"email": f"{run}-3@example.com", "colour": "red"},
    ]
    response = await time_api.post("/v1/contacts/import", json=rows)
    assert response.status_code == 200, response.text
    assert response.json()["created"] == 1 and response.json()["updated"] == 1
    assert "unknown field 'colour'" in response.json()["errors"][0]["error"]
    stored = (await time_api.get(f"/v1/contacts/{old['id']}")).json()
    assert stored["attributes"] == {"a": 1, "c": 3} and stored["tags"] == ["t"]
    assert stored["email"] == old["email"]

    ndjson = "\n".join(json.dumps(r) for r in [
        {"email": f"{run}-2@example.com", "phone": "+14155550199"},
        {"email": f"{run}-4@example.com"},
    ])  # fmt: skip
    response = await time_api.post(
        "/v1/contacts/import", content=ndjson, headers={"Content-Type": "application/x-ndjson"}
    )
    assert response.json()["created"] == 1 and response.json()["updated"] == 1
    second = await by_email(settings, f"{run}-2@example.com")
    assert second is not None
    assert second.phone == "+14155550199" and second.lifecycle_stage == "customer"


@pytest.mark.parametrize(
    ("content", "content_type", "status", "problem"),
    [
        ("email,plan\na@x.com,1,2\n", "text/csv", 400, "line 2: 3 fields, the header has 2"),
        ('email\n"a@x.com\n', "text/csv", 400, "malformed csv: line"),
        ("plan\n1\n", "text/csv", 400, "needs an email or an external_id column"),
        ("", "text/csv", 400, "no header row"),
        ('[{"email": "a@x.com"}, {"email": ]', "application/json", 400, "element 2"),
        ('[{"email": "a@x.com"},]', "application/json", 400, "element 2 is not an object"),
        ('{"email": "a@x.com"}', "application/json", 400, "expected '['"),
        ('{"email": "a@x.com"}\n{oops}\n', "application/x-ndjson", 400, "line 2"),
        (b"email\n\xff@x.com\n", "text/csv", 400, "not UTF-8"),
        ("email\na@x.com\n", "application/xml", 415, "unsupported content type"),
    ],
)
async def test_import_malformed_body_stores_nothing(
    time_api: httpx.AsyncClient,
    settings: Settings,
    content: str | bytes,
    content_type: str,
    status: int,
    problem: str,
) -> None:
    # A valid first row proves the whole import is rolled back, not just the broken part.
    before = await count_contacts(settings)
    response = await time_api.post(
        "/v1/contacts/import", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == status, response.text
    assert problem in response.json()["detail"]
    assert await count_contacts(settings) == before


@pytest.fixture
async def small_api(
    time_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    limited = settings.model_copy(update={"import_max_rows": 3, "import_max_bytes": 2000})
    app = create_app(limited, temporal=time_env.client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://nurture.test",
        headers={"Authorization": f"Bearer {limited.api_key}"},
    ) as client:
        yield client


@pytest.mark.parametrize(("rows", "problem"), [(4, "more than 3 rows"), (200, "larger than 2000")])
async def test_import_over_the_limits_is_413_and_stores_nothing(
    small_api: httpx.AsyncClient, settings: Settings, rows: int, problem: str
) -> None:
    run = unique("limit")
    body = "email\n" + "".join(f"{run}-{i}@example.com\n" for i in range(rows))
    before = await count_contacts(settings)
    response = await small_api.post("/v1/contacts/import", content=body, headers=CSV)
    assert response.status_code == 413 and problem in response.json()["detail"]
    assert await count_contacts(settings) == before
    async with session_scope(settings.database_url) as session:
        found = await session.exec(select(Contact).where(col(Contact.email).like(f"{run}-%")))
        assert found.all() == []
