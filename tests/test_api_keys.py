"""API keys: stored hashed, scoped (read, write, admin), revoked at once in every process;
the bootstrap key keeps working; provider webhooks take signatures, never API keys."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from api.keys import authenticate_key
from api.main import create_app
from models.db import session_scope
from models.tables import ApiKey
from settings import PROJECT_DIR, Settings
from tests.helpers import unique


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def basic(key: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{key}:".encode()).decode()}


async def make_key(api: httpx.AsyncClient, *scopes: str) -> dict[str, Any]:
    response = await api.post("/v1/api-keys", json={"name": unique("key"), "scopes": scopes})
    assert response.status_code == 201, response.text
    return dict(response.json())


@pytest.fixture
async def second_process(
    time_env: WorkflowEnvironment, settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """Another API app on the same database, as a second process would be (no key given)."""
    app = create_app(settings, temporal=time_env.client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://other.test"
    ) as client:
        yield client


async def test_created_key_is_shown_once_and_stored_only_as_its_hash(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    created = await make_key(time_api, "write", "read")
    raw = created["key"]
    assert raw.startswith("nk_") and len(raw) >= 40
    assert created["scopes"] == ["read", "write"] and created["prefix"] == raw[:12]
    listed = (await time_api.get("/v1/api-keys")).json()["keys"]
    mine = next(k for k in listed if k["id"] == created["id"])
    assert "key" not in mine and mine["revoked_at"] is None
    async with session_scope(settings.database_url) as session:
        row = await session.get(ApiKey, uuid.UUID(created["id"]))
        assert row is not None and row.key_hash == hashlib.sha256(raw.encode()).hexdigest()
        dump = await session.exec(text("SELECT row_to_json(k)::text FROM api_keys k"))  # type: ignore[call-overload]
        assert all(raw not in line for (line,) in dump.all())


async def test_scopes_are_enforced_on_every_kind_of_route(time_api: httpx.AsyncClient) -> None:
    person = (
        await time_api.post("/v1/contacts", json={"email": f"{unique('s')}@example.com"})
    ).json()["contact"]
    read = (await make_key(time_api, "read"))["key"]
    write = (await make_key(time_api, "write"))["key"]
    admin = (await make_key(time_api, "admin"))["key"]
    contact_url = f"/v1/contacts/{person['id']}"
    new_contact = {"email": f"{unique('n')}@example.com"}
    preview = {"condition": {"attr": "plan", "op": "eq", "value": "pro"}}

    async def code(method: str, url: str, key: str, **kw: Any) -> int:
        response = await time_api.request(method, url, headers=bearer(key), **kw)
        return response.status_code

    # read: GET and the side-effect-free POSTs; nothing that writes; no key management.
    assert await code("GET", contact_url, read) == 200
    assert await code("POST", "/v1/segments/preview", read, json=preview) == 200
    refused = await time_api.post("/v1/contacts", json=new_contact, headers=bearer(read))
    assert refused.status_code == 403
    assert refused.json()["detail"] == "this API key lacks the 'write' scope (it has: read)"
    assert await code("GET", "/v1/api-keys", read) == 403
    # write: mutations, but not reading contacts back (a write key may live in a web page).
    assert await code("POST", "/v1/contacts", write, json=new_contact) in (200, 201)
    assert await code("GET", contact_url, write) == 403
    assert await code("POST", "/v1/api-keys", write, json={"name": "x", "scopes": ["admin"]}) == 403
    # admin: everything.
    assert await code("GET", contact_url, admin) == 200
    assert await code("GET", "/v1/api-keys", admin) == 200
    assert await code("POST", "/v1/contacts", admin, json=new_contact) in (200, 201)


async def test_revoked_key_fails_at_once_in_every_process(
    time_api: httpx.AsyncClient, second_process: httpx.AsyncClient
) -> None:
    key = await make_key(time_api, "read")
    assert (await second_process.get("/v1/journeys", headers=bearer(key["key"]))).status_code == 200
    revoked = await time_api.post(f"/v1/api-keys/{key['id']}/revoke")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"] is not None
    after = await second_process.get("/v1/journeys", headers=bearer(key["key"]))
    assert after.status_code == 401 and after.json()["detail"] == "invalid API key"
    again = await time_api.delete(f"/v1/api-keys/{key['id']}")
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]


async def test_last_used_is_recorded(time_api: httpx.AsyncClient) -> None:
    key = await make_key(time_api, "read")
    assert key["last_used_at"] is None
    await time_api.get("/v1/journeys", headers=bearer(key["key"]))
    seen = (await time_api.get(f"/v1/api-keys/{key['id']}")).json()
    assert seen["last_used_at"] is not None


async def test_unknown_and_malformed_keys_are_refused(time_api: httpx.AsyncClient) -> None:
    real = (await make_key(time_api, "admin"))["key"]
    for wrong in ("nk_" + "A" * 43, real[:-1] + ("B" if real[-1] != "B" else "C"), real[:12],
                  "nk_" + "x" * 5000, "test-api-key2", "TEST-API-KEY"):  # fmt: skip
        response = await time_api.get("/v1/journeys", headers=bearer(wrong))
        assert response.status_code == 401, wrong
    # The key is the credential; a key's id or prefix is not.
    key = await make_key(time_api, "read")
    for not_a_key in (key["id"], key["prefix"]):
        response = await time_api.get(
            "/v1/journeys", headers={"Authorization": "", "X-API-Key": not_a_key}
        )
        assert response.status_code == 401


async def test_bootstrap_key_is_admin_in_every_header_form(time_api: httpx.AsyncClient) -> None:
    for headers in (bearer("test-api-key"), {"X-API-Key": "test-api-key"}, basic("test-api-key")):
        response = await time_api.get("/v1/api-keys", headers={"Authorization": "", **headers})
        assert response.status_code == 200, headers


async def test_segment_basic_auth_takes_a_write_key_and_refuses_a_read_key(
    time_api: httpx.AsyncClient,
) -> None:
    write = (await make_key(time_api, "write"))["key"]
    read = (await make_key(time_api, "read"))["key"]
    call = {"userId": unique("u"), "event": "Signed Up", "messageId": unique("m")}
    ok = await time_api.post("/v1/track", json=call, headers=basic(write))
    refused = await time_api.post("/v1/track", json={**call, "messageId": unique("m")},
                                  headers=basic(read))  # fmt: skip
    assert ok.status_code == 200, ok.text
    assert refused.status_code == 403


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"name": "x", "scopes": ["superuser"]}, "scopes"),
        ({"name": "x", "scopes": []}, "scopes"),
        ({"scopes": ["read"]}, "name"),
        ({"name": "", "scopes": ["read"]}, "name"),
        ({"name": "x", "scopes": ["read"], "expires": "never"}, "expires"),
    ],
)
async def test_bad_key_requests_are_refused_naming_the_field(
    time_api: httpx.AsyncClient, settings: Settings, body: dict[str, Any], named: str
) -> None:
    async with session_scope(settings.database_url) as session:
        before = (await session.exec(text("SELECT count(*) FROM api_keys"))).one()  # type: ignore[call-overload]
    response = await time_api.post("/v1/api-keys", json=body)
    assert response.status_code == 422
    assert named in json.dumps(response.json())
    async with session_scope(settings.database_url) as session:
        after = (await session.exec(text("SELECT count(*) FROM api_keys"))).one()  # type: ignore[call-overload]
    assert after == before


async def test_revoking_an_unknown_key_is_404(time_api: httpx.AsyncClient) -> None:
    assert (await time_api.post(f"/v1/api-keys/{uuid.uuid4()}/revoke")).status_code == 404
    assert (await time_api.post("/v1/api-keys/not-a-uuid/revoke")).status_code == 422


async def test_cli_creates_lists_and_revokes_keys(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    env = {**os.environ, "NURTURE_DATABASE_URL": settings.database_url or ""}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "api.keys", *args],
            cwd=PROJECT_DIR, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    name = unique("cli")
    created = cli("create", "--name", name, "--scope", "write")
    assert created.returncode == 0, created.stderr
    raw = created.stdout.strip().splitlines()[-1]
    key_id = created.stdout.split()[2]
    assert (await time_api.post("/v1/contacts", json={"email": f"{name}@example.com"},
                                headers=bearer(raw))).status_code in (200, 201)  # fmt: skip
    assert name in cli("list").stdout and raw not in cli("list").stdout
    assert cli("revoke", key_id).returncode == 0
    assert (await time_api.get("/v1/journeys", headers=bearer(raw))).status_code == 401
    bad = cli("create", "--name", "x", "--scope", "root")
    assert bad.returncode == 2 and "invalid choice" in bad.stderr


async def test_authenticate_key_for_other_front_ends(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    """The function the dashboard logs in with: a principal with scopes, or None."""
    key = await make_key(time_api, "read")
    async with session_scope(settings.database_url) as session:
        principal = await authenticate_key(session, settings, key["key"])
        bootstrap = await authenticate_key(session, settings, "test-api-key")
        nobody = await authenticate_key(session, settings, "nk_nope")
    assert principal is not None and principal.id == uuid.UUID(key["id"])
    assert {str(s) for s in principal.scopes} == {"read"}
    assert (
        bootstrap is not None
        and bootstrap.id is None
        and {str(s) for s in bootstrap.scopes} == {"admin"}
    )
    assert nobody is None


async def test_webhooks_take_provider_signatures_not_api_keys(
    time_api: httpx.AsyncClient, settings: Settings
) -> None:
    admin = (await make_key(time_api, "admin"))["key"]
    body = json.dumps([{"event": "delivered", "sg_event_id": unique("sg")}])
    for headers in (bearer("test-api-key"), bearer(admin), {"X-API-Key": admin}, basic(admin)):
        sendgrid = await time_api.post(
            "/webhooks/sendgrid",
            content=body,
            headers={**headers, "Content-Type": "application/json"},
        )
        twilio = await time_api.post(
            "/webhooks/twilio/inbound",
            data={"MessageSid": "SM1", "From": "+14155550123", "Body": "STOP"},
            headers=headers,
        )
        assert (sendgrid.status_code, twilio.status_code) == (403, 403), headers


def test_scope_map_names_real_endpoints() -> None:
    """A renamed endpoint must not silently drop out of the scope map."""
    import importlib

    from api.deps import ADMIN_MODULES, READ_ONLY_POSTS

    for dotted in READ_ONLY_POSTS:
        module, _, name = dotted.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name, None)), dotted
    for module in ADMIN_MODULES:
        assert importlib.import_module(module).router.routes
