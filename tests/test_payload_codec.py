"""Contact PII in Temporal: payloads encrypted by the codec (AES-256-GCM, rotating keys),
and the codec server that decrypts them for authorised operators only."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from temporalio.api.common.v1 import Payload
from temporalio.api.testservice.v1 import LockTimeSkippingRequest, UnlockTimeSkippingRequest
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Replayer

from api.main import create_app
from models.codec import (
    ENCODING,
    KEY_ID,
    EncryptionCodec,
    PayloadKeyError,
    data_converter,
    new_key,
    parse_keys,
)
from settings import Settings
from tests.helpers import contact, enroll, publish, put_template, unique, wait_for_step
from tests.test_replay import HISTORIES
from worker import build_worker
from workflows.journey import JourneyWorkflow

OLD, NEW = new_key("old"), new_key("new")


def codec(*keys: str) -> EncryptionCodec:
    return EncryptionCodec(parse_keys(",".join(keys)))


def plain(text: str) -> Payload:
    return Payload(metadata={"encoding": b"json/plain"}, data=json.dumps(text).encode())


# The codec -------------------------------------------------------------------------------


async def test_payloads_round_trip_and_carry_the_key_id() -> None:
    original = plain("ada@example.com")
    [sealed] = await codec(NEW).encode([original])
    assert sealed.metadata["encoding"] == ENCODING and sealed.metadata[KEY_ID] == b"new"
    assert b"ada@example.com" not in sealed.SerializeToString()
    assert await codec(NEW).decode([sealed]) == [original]
    # Random nonces: the same payload never encrypts the same way twice.
    [again] = await codec(NEW).encode([original])
    assert again.data != sealed.data


async def test_rotation_old_keys_decrypt_new_payloads_use_the_new_key() -> None:
    [under_old] = await codec(OLD).encode([plain("old secret")])
    rotated = codec(NEW, OLD)
    assert await rotated.decode([under_old]) == [plain("old secret")]
    [under_new] = await rotated.encode([plain("new secret")])
    assert under_new.metadata[KEY_ID] == b"new"
    # Once the old key is dropped, what it sealed no longer opens.
    with pytest.raises(PayloadKeyError, match="unknown key id 'old'"):
        await codec(NEW).decode([under_old])


async def test_tampered_or_relabelled_payloads_fail_authentication() -> None:
    both = codec(NEW, OLD)
    [sealed] = await both.encode([plain("x")])
    flipped = Payload(
        metadata=sealed.metadata, data=sealed.data[:-1] + bytes([sealed.data[-1] ^ 1])
    )
    relabelled = Payload(metadata={**sealed.metadata, KEY_ID: b"old"}, data=sealed.data)
    for bad in (flipped, relabelled):
        with pytest.raises(PayloadKeyError, match="fails authentication"):
            await both.decode([bad])


async def test_plain_payloads_decode_unchanged() -> None:
    """Histories written before keys were configured stay readable."""
    assert await codec(NEW).decode([plain("p")]) == [plain("p")]


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("k1", "kid:base64key"),
        (":" + base64.b64encode(b"x" * 32).decode(), "kid:base64key"),
        ("k1:not base64!", "not base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "AES-256 needs 32"),
        (f"{NEW},{NEW}", "appears twice"),
    ],
)
def test_bad_key_settings_are_refused(text: str, error: str) -> None:
    with pytest.raises(ValueError, match=error):
        parse_keys(text)


def test_no_keys_means_plain_payloads(settings: Settings) -> None:
    assert data_converter(settings) is DataConverter.default
    assert parse_keys("") == [] and parse_keys(" , ") == []


# A journey's history ---------------------------------------------------------------------


@pytest.fixture
def keyed_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"payload_keys": f"{NEW},{OLD}"})


async def _history_bytes(client: Client, workflow_id: str) -> bytes:
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    return b"".join(event.SerializeToString() for event in history.events)


async def _run_pii_journey(
    env: WorkflowEnvironment, app_settings: Settings, client: Client
) -> tuple[str, dict[str, str]]:
    """A journey that reads the contact, waits for an event carrying PII, and emails; run
    through the API and a worker that both use ``client``. Returns its id and the PII."""
    pii = {
        "email": f"{unique('grace')}@example.com",
        "phone": "+14155550142",
        "name": unique("Hopper"),
        "secret": unique("token-in-event"),
    }
    app = create_app(app_settings, temporal=client)
    async with (
        httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app),
            base_url="http://nurture.test",
            headers={"Authorization": "Bearer test-api-key"},
        ) as api,
        build_worker(client, app_settings),
    ):
        template = unique("pii")
        await put_template(api, template, subject="Hi {{ contact.first_name }}")
        key = unique("pii")
        await publish(api, {"key": key, "name": "PII", "steps": [
            {"id": "hear", "type": "wait_for", "event": "shared_secret", "timeout": "1d",
             "on_event": "who", "on_timeout": "who"},
            {"id": "who", "type": "branch",
             "cases": [{"if": {"attr": "first_name", "op": "eq", "value": pii["name"]},
                        "goto": "mail"}], "else": "mail"},
            {"id": "mail", "type": "email", "template": template},
            {"id": "done", "type": "exit"},
        ]})  # fmt: skip
        person = await contact(
            api, email=pii["email"], phone=pii["phone"], attributes={"first_name": pii["name"]}
        )
        enrolled = (await enroll(api, key, person["id"]))["enrollment"]
        await wait_for_step(api, enrolled["id"], "hear")
        event = await api.post(
            "/v1/events",
            json={"email": pii["email"], "name": "shared_secret",
                  "properties": {"secret": pii["secret"], "phone": pii["phone"]}},
        )  # fmt: skip
        assert event.status_code == 202, event.text
        run_id = (await client.get_workflow_handle(enrolled["workflow_id"]).describe()).run_id
        handle = client.get_workflow_handle_for(
            JourneyWorkflow.run, enrolled["workflow_id"], run_id=run_id
        )
        await env.client.test_service.unlock_time_skipping(UnlockTimeSkippingRequest())
        try:
            async with asyncio.timeout(90):
                result = await handle.result()
        finally:
            await env.client.test_service.lock_time_skipping(LockTimeSkippingRequest())
        assert result.status == "exited"
    return enrolled["workflow_id"], pii


async def test_journey_history_holds_no_contact_pii_in_the_clear(
    time_env: WorkflowEnvironment, keyed_settings: Settings
) -> None:
    coded = Client(
        time_env.client.service_client,
        namespace=time_env.client.namespace,
        data_converter=data_converter(keyed_settings),
    )
    workflow_id, pii = await _run_pii_journey(time_env, keyed_settings, coded)
    # Read as anyone with access to Temporal but no key would: ciphertext only.
    raw = await _history_bytes(time_env.client, workflow_id)
    for value in pii.values():
        assert value.encode() not in raw, value
    assert ENCODING in raw
    # The contact id (a search attribute) stays readable: the UI can still find the run.
    # With the codec the same history is fully readable.
    history = await coded.get_workflow_handle(workflow_id).fetch_history()
    decoded: list[Payload] = []
    for event in history.events:
        if event.HasField("activity_task_completed_event_attributes"):
            payloads = event.activity_task_completed_event_attributes.result.payloads
            decoded += await coded.data_converter.payload_codec.decode(payloads)  # type: ignore[union-attr]
    decoded_bytes = b"".join(p.data for p in decoded)
    assert pii["email"].encode() in decoded_bytes and pii["name"].encode() in decoded_bytes


async def test_without_keys_the_same_history_is_plain(
    time_env: WorkflowEnvironment, settings: Settings
) -> None:
    """The control: the check above can fail (PII does reach histories unencrypted)."""
    workflow_id, pii = await _run_pii_journey(time_env, settings, time_env.client)
    raw = await _history_bytes(time_env.client, workflow_id)
    assert pii["email"].encode() in raw and pii["secret"].encode() in raw


# The codec server ------------------------------------------------------------------------


@pytest.fixture
async def codec_api(
    time_env: WorkflowEnvironment, keyed_settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    """The API with payload keys, and no key sent by default."""
    app = create_app(keyed_settings, temporal=time_env.client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture.test"
    ) as client:
        yield client


def as_json(payload: Payload) -> dict[str, Any]:
    return json_format.MessageToDict(payload)


async def sealed_payloads() -> tuple[list[Payload], list[Payload]]:
    originals = [plain("ada@example.com"), plain("+14155550123")]
    return originals, await codec(NEW).encode(originals)


async def test_codec_server_decrypts_for_an_admin_key_only(codec_api: httpx.AsyncClient) -> None:
    originals, sealed = await sealed_payloads()
    body = {"payloads": [as_json(p) for p in sealed] + [as_json(plain("summary"))]}
    admin = {"Authorization": "Bearer test-api-key", "X-Namespace": "default"}
    created = await codec_api.post(
        "/v1/api-keys", json={"name": "reader", "scopes": ["read", "write"]}, headers=admin
    )
    reader = created.json()["key"]

    authorised = await codec_api.post("/codec/decode?preserveStorageRefs=true", json=body,
                                      headers=admin)  # fmt: skip
    assert authorised.status_code == 200, authorised.text
    assert authorised.json()["payloads"] == [as_json(p) for p in originals] + [
        as_json(plain("summary"))
    ]
    assert base64.b64decode(authorised.json()["payloads"][0]["data"]) == b'"ada@example.com"'

    for headers in ({}, {"Authorization": f"Bearer {reader}"}, {"Authorization": "Bearer nope"},
                    {"X-API-Key": reader}):  # fmt: skip
        refused = await codec_api.post("/codec/decode", json=body, headers=headers)
        assert refused.status_code == 200
        assert refused.json() == body, headers  # ciphertext (and the plain one) unchanged

    # The dev server's UI cannot send headers: the key may sit in the endpoint's path.
    in_path = await codec_api.post("/codec/key/test-api-key/decode", json=body)
    wrong_path = await codec_api.post(f"/codec/key/{reader}/decode", json=body)
    assert in_path.json() == authorised.json() and wrong_path.json() == body


async def test_codec_server_encodes_for_the_ui_and_round_trips(
    codec_api: httpx.AsyncClient,
) -> None:
    admin = {"Authorization": "Bearer test-api-key"}
    body = {"payloads": [as_json(plain("signal input"))]}
    encoded = await codec_api.post("/codec/encode", json=body, headers=admin)
    [sealed] = encoded.json()["payloads"]
    assert base64.b64decode(sealed["metadata"]["encoding"]) == ENCODING
    decoded = await codec_api.post("/codec/decode", json=encoded.json(), headers=admin)
    assert decoded.json() == body
    # Without a key nothing is encrypted for the caller.
    assert (await codec_api.post("/codec/encode", json=body)).json() == body


async def test_codec_server_refuses_bad_input(codec_api: httpx.AsyncClient) -> None:
    admin = {"Authorization": "Bearer test-api-key"}
    [sealed] = await codec(NEW).encode([plain("x")])
    [unknown] = await codec(new_key("gone")).encode([plain("x")])
    tampered = as_json(sealed) | {"data": base64.b64encode(b"\0" * 40).decode()}
    cases: list[tuple[Any, dict[str, str], int, str]] = [
        ({"payloads": [{"data": "not base64!"}]}, admin, 400, "payloads[0]"),
        ({"payloads": [{"metadata": {"encoding": "%%%"}}]}, admin, 400, "payloads[0]"),
        ({"payloads": "x"}, admin, 422, "payloads"),
        ({}, admin, 422, "payloads"),
        ({"payloads": [as_json(unknown)]}, admin, 422, "unknown key id 'gone'"),
        ({"payloads": [as_json(plain("ok")), tampered]}, admin, 422, "payloads[1]"),
        ({"payloads": []}, {**admin, "X-Namespace": "other"}, 400, "serves namespace"),
    ]
    for body, headers, code, named in cases:
        response = await codec_api.post("/codec/decode", json=body, headers=headers)
        assert response.status_code == code, (body, response.text)
        assert named in response.text
    not_json = await codec_api.post(
        "/codec/decode", content=b"{", headers={**admin, "Content-Type": "application/json"}
    )
    assert 400 <= not_json.status_code < 500
    assert (await codec_api.post("/codec/download", json={"payloads": []})).status_code == 404


async def test_codec_server_answers_cors_for_the_ui_origin_only(
    codec_api: httpx.AsyncClient,
) -> None:
    preflight = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    ui = await codec_api.options(
        "/codec/decode", headers={**preflight, "Origin": "http://localhost:8233"}
    )
    assert ui.status_code == 204
    assert ui.headers["Access-Control-Allow-Origin"] == "http://localhost:8233"
    assert "x-namespace" in ui.headers["Access-Control-Allow-Headers"].lower()
    assert "POST" in ui.headers["Access-Control-Allow-Methods"]
    evil = await codec_api.options(
        "/codec/decode", headers={**preflight, "Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and "Access-Control-Allow-Origin" not in evil.headers
    posted = await codec_api.post(
        "/codec/decode", json={"payloads": []}, headers={"Origin": "http://127.0.0.1:8233"}
    )
    assert posted.headers["Access-Control-Allow-Origin"] == "http://127.0.0.1:8233"


async def test_codec_server_without_keys_returns_payloads_unchanged(
    time_api: httpx.AsyncClient,
) -> None:
    [sealed] = await codec(NEW).encode([plain("x")])
    body = {"payloads": [as_json(sealed)]}
    response = await time_api.post("/codec/decode", json=body)
    assert response.status_code == 200 and response.json() == body


async def test_encrypted_history_replays_with_the_codec_and_plain_histories_still_do(
    time_env: WorkflowEnvironment, keyed_settings: Settings
) -> None:
    """Turning encryption on breaks no running journey: recorded plain histories and new
    encrypted ones both replay through the codec's data converter."""
    converter = data_converter(keyed_settings)
    replayer = Replayer(workflows=[JourneyWorkflow], data_converter=converter)
    for path in sorted(HISTORIES.glob("*.json")):
        recorded = json.loads(await asyncio.to_thread(path.read_text))
        await replayer.replay_workflow(
            WorkflowHistory.from_json(recorded["workflow_id"], recorded["history"])
        )
    coded = Client(
        time_env.client.service_client,
        namespace=time_env.client.namespace,
        data_converter=converter,
    )
    workflow_id, _ = await _run_pii_journey(time_env, keyed_settings, coded)
    history = await coded.get_workflow_handle(workflow_id).fetch_history()
    await replayer.replay_workflow(history)
