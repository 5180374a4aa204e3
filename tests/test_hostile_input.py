"""Hostile input: oversized, deeply nested, badly encoded and unknown-field bodies are
refused with a 4xx that says why, and nothing is stored; the endpoints anyone can call
are rate limited across processes; template sandbox escapes fail."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from temporalio.testing import WorkflowEnvironment

from api.guard import json_depth
from api.main import create_app
from api.ratelimit import hit
from models.db import session_scope
from settings import Settings
from tests.helpers import contact, put_template, unique

CONTACT_COUNT = text("SELECT count(*) FROM contacts")


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for i in range(depth):
        value = {"k": value} if i % 2 else [value]
    return value


class Deep:
    """A value ``depth`` arrays deep, written by hand: json.dumps itself would recurse."""

    def __init__(self, depth: int) -> None:
        self.depth = depth


def dumps(body: Any) -> bytes:
    marker = '"__deep__"'
    deep: list[int] = []

    def default(value: Any) -> Any:
        deep.append(value.depth)
        return "__deep__"

    text = json.dumps(body, default=default)
    for depth in deep:
        text = text.replace(marker, "[" * depth + "1" + "]" * depth, 1)
    return text.encode()


async def count(settings: Settings, query: Any = CONTACT_COUNT, **params: Any) -> int:
    async with session_scope(settings.database_url) as session:
        return int((await session.exec(query, params=params)).one()[0])


def random_ip() -> str:
    return f"10.{random.randrange(256)}.{random.randrange(256)}.{random.randrange(1, 255)}"


def client_from(app: Any, ip: str, **headers: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app, client=(ip, 40000)),
        base_url="http://nurture.test",
        headers=headers,
    )


def test_json_depth_counts_nesting_and_skips_strings() -> None:
    assert json_depth(b'{"a": [1, {"b": "[[[[{{{{"}]}') == 3
    assert json_depth(b'"\\"[[["') == 0
    assert json_depth(json.dumps(nested(40)).encode()) == 40
    assert json_depth(b"[" * 10_000) == 10_000  # unclosed: still measured, not parsed
    assert json_depth(b'"unterminated [[[') == 0


# Body size -----------------------------------------------------------------------------


@pytest.fixture
def small_body_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_body_bytes": 2048})


@pytest.fixture
async def small_api(
    time_env: WorkflowEnvironment, small_body_settings: Settings
) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(small_body_settings, temporal=time_env.client)
    async with client_from(app, "127.0.0.1", Authorization="Bearer test-api-key") as client:
        yield client


async def test_oversized_bodies_are_refused_with_413_and_nothing_is_stored(
    small_api: httpx.AsyncClient, small_body_settings: Settings
) -> None:
    before = await count(small_body_settings)
    email = f"{unique('big')}@example.com"
    big = {"email": email, "attributes": {"bio": "x" * 5000}}
    announced = await small_api.post("/v1/contacts", json=big)
    assert announced.status_code == 413
    assert announced.json()["detail"] == (
        "the request body is over 2048 bytes (NURTURE_MAX_BODY_BYTES)"
    )

    async def chunks(data: bytes) -> AsyncIterator[bytes]:
        for start in range(0, len(data), 1000):
            yield data[start : start + 1000]

    # Streamed without Content-Length: counted as it arrives, JSON and otherwise.
    streamed_json = await small_api.post(
        "/v1/contacts",
        content=chunks(json.dumps(big).encode()),
        headers={"Content-Type": "application/json"},
    )
    streamed_yaml = await small_api.post(
        "/v1/journeys",
        content=chunks(b"key: big\nname: big\nsteps: []\n" + b"# padding\n" * 500),
        headers={"Content-Type": "application/yaml"},
    )
    form = await small_api.post(
        "/webhooks/forms/signup",
        content=chunks(b"email=a%40example.com&bio=" + b"x" * 5000),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    # A form body where the route expects JSON: FastAPI reads it, the guard still counts.
    form_to_json_route = await small_api.post(
        "/v1/contacts",
        content=chunks(b"email=a%40example.com&bio=" + b"x" * 5000),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    codes = [streamed_json, streamed_yaml, form, form_to_json_route]
    assert [r.status_code for r in codes] == [413] * 4
    assert "over 2048 bytes" in streamed_yaml.json()["detail"]
    assert await count(small_body_settings) == before
    assert (await small_api.get("/v1/journeys/big")).status_code == 404
    # Just under the limit is fine.
    ok = await small_api.post("/v1/contacts", json={"email": email, "attributes": {"bio": "x"}})
    assert ok.status_code in (200, 201), ok.text


async def test_bad_content_length_is_a_400(small_api: httpx.AsyncClient) -> None:
    response = await small_api.post(
        "/v1/contacts", content=b"{}", headers={"Content-Length": "abc"}
    )
    assert response.status_code == 400 and "Content-Length" in response.text


# Nesting, encoding, non-finite numbers --------------------------------------------------


DEEP_TARGETS = [
    ("/v1/contacts", lambda d: {"email": "deep@example.com", "attributes": {"x": Deep(d)}}),
    ("/v1/events", lambda d: {"email": "deep@example.com", "name": "e", "properties": Deep(d)}),
    ("/v1/journeys", lambda d: {"key": "deep", "name": "d", "steps": [], "x": Deep(d)}),
    ("/v1/segments/preview", lambda d: {"condition": Deep(d)}),
    ("/v1/track", lambda d: {"userId": "deep", "event": "e", "properties": Deep(d)}),
    ("/webhooks/sendgrid", lambda d: [{"event": "open", "x": Deep(d)}]),
    ("/webhooks/forms/deep", lambda d: {"email": "deep@example.com", "x": Deep(d)}),
    ("/codec/decode", lambda d: {"payloads": Deep(d)}),
]


@pytest.mark.parametrize(("path", "body"), DEEP_TARGETS, ids=[p for p, _ in DEEP_TARGETS])
async def test_deeply_nested_json_is_refused_with_400_everywhere(
    time_api: httpx.AsyncClient, settings: Settings, path: str, body: Any
) -> None:
    before = await count(settings)
    for depth in (33, 5000):
        response = await time_api.post(
            path, content=dumps(body(depth)), headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (depth, response.text)
        assert "levels deep; at most 32 are allowed" in response.json()["detail"]
    # analytics.js sends JSON as text/plain: checked the same way.
    plain = await time_api.post(
        path, content=dumps(body(100)), headers={"Content-Type": "text/plain"}
    )
    assert plain.status_code == 400
    assert await count(settings) == before


async def test_nesting_at_the_limit_is_accepted(time_api: httpx.AsyncClient) -> None:
    # The body and its attributes are two levels; x holds the other 30.
    body = {"email": f"{unique('d')}@example.com", "attributes": {"x": nested(30)}}
    assert json_depth(json.dumps(body).encode()) == 32
    response = await time_api.post("/v1/contacts", json=body)
    assert response.status_code in (200, 201), response.text


@pytest.mark.parametrize(
    ("content", "content_type"),
    [
        ('{"email": "caf\u00e9@example.com"}'.encode("latin-1"), "application/json"),
        ('{"email": "a@example.com"}'.encode("utf-16"), "application/json"),
        (b'{"email": "a@example.com", "attributes": {"x": "\xff\xfe"}}', "application/json"),
        (b'{"email": "a@example.com"}\xc0\xaf', "text/plain"),
    ],
    ids=["latin-1", "utf-16", "invalid-bytes", "overlong-utf8"],
)
async def test_non_utf8_json_is_refused_with_400(
    time_api: httpx.AsyncClient, settings: Settings, content: bytes, content_type: str
) -> None:
    before = await count(settings)
    response = await time_api.post(
        "/v1/contacts", content=content, headers={"Content-Type": content_type}
    )
    assert response.status_code == 400, response.text
    assert "not valid UTF-8" in response.json()["detail"]
    assert await count(settings) == before


async def test_non_utf8_yaml_journey_is_refused(time_api: httpx.AsyncClient) -> None:
    body = "key: caf\u00e9\nname: x\nsteps: []\n".encode("latin-1")
    response = await time_api.post(
        "/v1/journeys", content=body, headers={"Content-Type": "application/yaml"}
    )
    assert response.status_code == 400 and "utf-8" in response.text.lower()


async def test_deep_yaml_and_alias_bombs_are_refused(time_api: httpx.AsyncClient) -> None:
    yaml_type = {"Content-Type": "application/yaml"}
    deep_flow = "key: deep\nname: d\nsteps: []\nx: " + "[" * 3000 + "]" * 3000 + "\n"
    deep_block = "key: deep\nname: d\nsteps: []\nx:\n" + "".join(
        "  " * (i + 1) + f"k{i}:\n" for i in range(200)
    )
    levels = ['a0: &a0 ["x","x","x","x","x","x","x","x","x"]']
    levels += [f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]" for i in range(1, 10)]
    bomb = "key: bomb\nname: b\nsteps: []\nx:\n" + "\n".join("  " + line for line in levels)
    for body, expected in ((deep_flow, "deeper than"), (deep_block, "deeper than"),
                           (bomb, "aliases")):  # fmt: skip
        response = await time_api.post("/v1/journeys", content=body, headers=yaml_type)
        assert response.status_code == 400, response.text
        assert expected in response.json()["detail"]


MALFORMED = {
    "nan": ('{"email": "n@example.com", "attributes": {"x": NaN}}', 422, 'Token \\"NaN\\"'),
    "infinity": ('{"email": "n@example.com", "attributes": {"x": -Infinity}}', 422,
                 "Infinity"),
    "overflow": ('{"email": "n@example.com", "attributes": {"x": 1e999}}', 422, "Infinity"),
    "huge-int": ('{"email": "n@example.com", "attributes": {"x": ' + "9" * 5000 + "}}", 400,
                 "a number of 5000 digits"),
    "lone-surrogate": ('{"email": "n@example.com", "attributes": {"x": "\\ud800"}}', 422,
                       "cannot be stored"),
    "nul": ('{"email": "n@example.com", "attributes": {"x": "\\u0000"}}', 422,
            "cannot be stored"),
    "truncated": ('{"email": "n@example.com"', 422, "json_invalid"),
    "two-documents": ('{"email": "n@example.com"}{"email": "m@example.com"}', 422, "Extra data"),
    "array": ("[]", 422, "valid dictionary"),
    "null": ("null", 422, "valid dictionary"),
    "empty": ("", 422, "Field required"),
}  # fmt: skip


@pytest.mark.parametrize("case", MALFORMED)
async def test_malformed_json_values_are_refused_naming_the_problem(
    time_api: httpx.AsyncClient, settings: Settings, case: str
) -> None:
    raw, code, named = MALFORMED[case]
    before = await count(settings)
    response = await time_api.post(
        "/v1/contacts", content=raw.encode(), headers={"Content-Type": "application/json"}
    )
    assert response.status_code == code, response.text
    assert named in response.text
    assert await count(settings) == before


# Unknown fields --------------------------------------------------------------------------


UNKNOWN_FIELD_TARGETS: list[tuple[str, str, dict[str, Any]]] = [
    ("POST", "/v1/contacts", {"email": "u@example.com", "emial": "typo"}),
    ("POST", "/v1/events", {"email": "u@example.com", "name": "e", "propertys": {}}),
    ("PUT", "/v1/templates/unknown-field", {"channel": "sms", "text": "hi", "sender": "x"}),
    ("PUT", "/v1/segments/unknown-field", {"name": "s", "condition": {}, "colour": "red"}),
    (
        "POST",
        "/v1/segments/preview",
        {"condition": {"attr": "a", "op": "eq", "value": 1}, "limit": 5},
    ),
    ("POST", "/v1/journeys", {"key": "unknown-field", "name": "n", "steps": [], "owner": "me"}),
    ("PUT", "/v1/scoring", {"rules": [], "thresholds": {}, "bonus": 1}),
    ("POST", "/v1/api-keys", {"name": "n", "scopes": ["read"], "expires": "never"}),
    ("POST", "/codec/decode", {"payloads": [], "namespace": "default"}),
]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    UNKNOWN_FIELD_TARGETS,
    ids=[f"{m} {p}" for m, p, _ in UNKNOWN_FIELD_TARGETS],
)
async def test_unknown_fields_are_refused_with_422_naming_them(
    time_api: httpx.AsyncClient, method: str, path: str, body: dict[str, Any]
) -> None:
    response = await time_api.request(method, path, json=body)
    assert response.status_code == 422, response.text
    unknown = next(k for k in body if k not in ("email", "name", "scopes", "channel", "text",
                                                "condition", "key", "steps", "rules",
                                                "thresholds", "payloads"))  # fmt: skip
    assert unknown in response.text


async def test_patch_with_unknown_field_changes_nothing(time_api: httpx.AsyncClient) -> None:
    person = await contact(time_api, phone="+14155550199")
    response = await time_api.patch(f"/v1/contacts/{person['id']}", json={"fone": "+1415555"})
    assert response.status_code == 422 and "fone" in response.text
    again = (await time_api.get(f"/v1/contacts/{person['id']}")).json()
    assert again["phone"] == "+14155550199"


async def test_arbitrary_properties_stay_accepted_where_they_belong(
    time_api: httpx.AsyncClient,
) -> None:
    email = f"{unique('any')}@example.com"
    free = {"any key": 1, "nested": {"deep": [1, {"x": None}]}, "ünïcödé": "✓"}
    upserted = await time_api.post("/v1/contacts", json={"email": email, "attributes": free})
    assert upserted.status_code in (200, 201) and upserted.json()["contact"]["attributes"] == free
    event = await time_api.post(
        "/v1/events", json={"email": email, "name": "anything", "properties": free}
    )
    assert event.status_code == 202, event.text
    # Segment calls carry fields Nurture does not read (context, integrations, ...).
    call = {
        "userId": unique("u"),
        "event": "Viewed",
        "properties": free,
        "context": {"ip": "1.2.3.4"},
        "integrations": {"All": True},
        "_metadata": {},
    }
    segment = await time_api.post("/v1/track", json=call)
    assert segment.status_code == 200, segment.text


# Rate limits -----------------------------------------------------------------------------


@pytest.fixture
def limited_settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={
            "tracking_rate_limit_per_ip": 4,
            "tracking_rate_limit_per_token": 3,
            "unsubscribe_rate_limit_per_ip": 3,
            "unsubscribe_rate_limit_per_token": 100,
            "rate_limit_window_seconds": 3600,
        }
    )


@pytest.fixture
def two_processes(time_env: WorkflowEnvironment, limited_settings: Settings) -> Iterator[Any]:
    """Two API apps on one database: two processes as far as shared state goes."""
    yield (
        create_app(limited_settings, temporal=time_env.client),
        create_app(limited_settings, temporal=time_env.client),
    )


async def test_tracking_is_rate_limited_per_address_across_processes(
    two_processes: Any, limited_settings: Settings
) -> None:
    ip = random_ip()
    first, second = two_processes
    async with client_from(first, ip) as one, client_from(second, ip) as two:
        codes = []
        for i in range(5):
            client = one if i % 2 else two
            codes.append((await client.get(f"/t/o/{uuid.uuid4()}.abc.gif")).status_code)
        limited = await one.get(f"/t/c/{uuid.uuid4()}.x")
    assert codes == [200, 200, 200, 200, 429]
    assert limited.status_code == 429
    retry_after = int(limited.headers["Retry-After"])
    assert 1 <= retry_after <= 3600
    assert "too many tracking requests" in limited.json()["detail"]
    # Another address is not held back.
    async with client_from(first, random_ip()) as other:
        assert (await other.get(f"/t/o/{uuid.uuid4()}.abc.gif")).status_code == 200


async def test_tracking_is_rate_limited_per_link(two_processes: Any) -> None:
    token = f"{uuid.uuid4()}.forged"
    first, second = two_processes
    codes = []
    for i in range(4):  # a new address each time: only the per-link bucket fills
        async with client_from(first if i % 2 else second, random_ip()) as client:
            codes.append((await client.get(f"/t/o/{token}.gif")).status_code)
    assert codes == [200, 200, 200, 429]


async def test_unsubscribe_is_rate_limited(two_processes: Any, limited_settings: Settings) -> None:
    first, _ = two_processes
    async with client_from(first, random_ip()) as client:
        codes = [(await client.get(f"/u/{uuid.uuid4()}.forged")).status_code for _ in range(3)]
        post = await client.post(f"/u/{uuid.uuid4()}.forged", content=b"List-Unsubscribe=One-Click")
    assert codes == [404, 404, 404]  # forged links, counted all the same
    assert post.status_code == 429 and "Retry-After" in post.headers


async def test_rate_limit_window_resets(settings: Settings) -> None:
    bucket = f"test:{uuid.uuid4()}"
    now = datetime(2026, 1, 1, 12, 0, 30, tzinfo=UTC)
    assert await hit(settings, {bucket: 1}, 60, now) is None
    assert await hit(settings, {bucket: 1}, 60, now + timedelta(seconds=10)) == 20
    assert await hit(settings, {bucket: 1}, 60, now + timedelta(seconds=31)) is None


# Template sandbox ------------------------------------------------------------------------


REFUSED_AT_SAVE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "{{ joiner.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "{{ self._TemplateReference__context }}",
    "{{ self.__dict__ }}",
    "{{ contact.__class__ }}",
    "{{ contact['__class__'] }}",
    "{{ ''|attr('__class__') }}",
    "{% for c in [].__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ request.application.__globals__.__builtins__ }}",
    "{{ config.__class__.__init__.__globals__ }}",
    "{{ contact._secret }}",
    "{{ '%s'|format(contact.__len__) }}",
]

HARMLESS_AT_RENDER = [
    "{{ range(10**9)|list }}",
    "{{ 9**(9**9) }}",
    "{{ 'a' * 10**9 }}",
    "{{ [0] * 10**9 }}",
    "{{ 'x'|center(10**9) }}",
    "{{ 'x'|indent(10**9) }}",
    "{{ '{0.__class__}'.format(contact) }}",
    "{{ config }}{{ request }}{{ settings }}",
    "{% include '/etc/passwd' %}",
    "{% import 'os' as os %}{{ os }}",
    "{% extends '/etc/hosts' %}",
    "{{ contact.update({'email': 'evil@example.com'}) }}",
    "{{ contact.attributes.clear() }}",
    "{% set x = contact.pop('email') %}{{ x }}",
]


@pytest.mark.parametrize("source", REFUSED_AT_SAVE)
async def test_template_escapes_are_refused_at_save(
    time_api: httpx.AsyncClient, settings: Settings, source: str
) -> None:
    key = unique("ssti")
    response = await time_api.put(
        f"/v1/templates/{key}", json={"channel": "email", "subject": "Hi", "html": source}
    )
    assert response.status_code == 422, response.text
    assert "private to the template engine" in response.json()["detail"]
    assert (await time_api.get(f"/v1/templates/{key}")).status_code == 404


@pytest.mark.parametrize("source", HARMLESS_AT_RENDER)
async def test_template_escapes_render_harmlessly_or_fail_with_422(
    time_api: httpx.AsyncClient, source: str
) -> None:
    person = await contact(time_api, attributes={"first_name": "Ada"})
    key = unique("ssti")
    await put_template(time_api, key, channel="sms", subject=None, html=None, text=source)
    response = await time_api.post(
        f"/v1/templates/{key}/preview", json={"contact_id": person["id"]}
    )
    assert response.status_code in (200, 422), response.text
    if response.status_code == 200:
        rendered = response.json()["text"]
        assert len(rendered) < 10_000
        for leaked in ("class", "root:", "localhost", "function", "module", "evil@"):
            assert leaked not in rendered, rendered
    # The contact is unchanged whatever the template tried.
    again = (await time_api.get(f"/v1/contacts/{person['id']}")).json()
    assert again["email"] == person["email"] and again["attributes"] == {"first_name": "Ada"}
