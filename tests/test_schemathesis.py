"""Schemathesis against the app's own OpenAPI schema, through ASGI: for every operation,
valid (positive) and invalid (negative) requests generated from the schema never get a
5xx, and every answer conforms to the schema (documented status code, content type and
body). Bounded examples per operation so the whole run takes a minute or two."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from temporalio.testing import WorkflowEnvironment

from api.main import create_app
from devstack.temporal import register_search_attributes
from settings import Settings
from tests.conftest import BIN

SCHEMA = schemathesis.openapi.from_dict(
    create_app(Settings(api_key="schema-only", database_url="postgresql://schema/only")).openapi()
)
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]  # type: ignore[union-attr]
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
EXAMPLES = 10


def _httpx_kwargs(case: Any) -> dict[str, Any]:
    """The request schemathesis would send (with requests), as bytes for httpx: requests
    serialises the JSON, form and multipart bodies exactly as schemathesis means them."""
    sent = case.as_transport_kwargs(
        base_url="http://nurture.test", headers={"Authorization": "Bearer test-api-key"}
    )
    prepared = requests.Request(
        **{k: v for k, v in sent.items() if k in ("method", "url", "headers", "params",
                                                 "cookies", "json", "data", "files")}
    ).prepare()  # fmt: skip
    body = prepared.body
    return {
        "method": prepared.method,
        "url": prepared.url,
        "headers": dict(prepared.headers),
        "content": body.encode() if isinstance(body, str) else body,
    }


def _negative_makes_sense(operation: Any) -> bool:
    """Invalid requests exist only where the schema constrains something: a JSON body, or
    a parameter that is not free text (free-text path tokens accept anything)."""
    raw = operation.definition.raw
    if "application/json" in raw.get("requestBody", {}).get("content", {}):
        return True
    for parameter in raw.get("parameters", []):
        schema = parameter.get("schema", {})
        if schema.get("type") != "string" or {"format", "pattern", "enum", "maxLength"} & set(
            schema
        ):
            return True
    return False


CASES = [
    pytest.param(op, mode, id=f"{op.label}-{mode.value}")
    for op in OPERATIONS
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
    if mode == GenerationMode.POSITIVE or _negative_makes_sense(op)
]


@pytest.fixture(scope="module")
async def api(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    """One app and one time-skipping server for every operation (started once: the run
    is about the HTTP surface, and a server per operation would double its time)."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=str(BIN / "temporal-test-server")
    )
    await register_search_attributes(env.client)
    app_settings = Settings(
        database_url=database_url,
        data_dir=tmp_path_factory.mktemp("schemathesis"),
        api_key="test-api-key",
        task_queue="tq-schemathesis",
        outbound_allow_private="127.0.0.1,::1",
    )
    app = create_app(app_settings, temporal=env.client)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://nurture.test"
    ) as client:
        yield client
    await env.shutdown()


@pytest.mark.parametrize(("operation", "mode"), CASES)
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
@given(data=st.data())
async def test_api_conforms_to_its_schema(
    api: httpx.AsyncClient, operation: Any, mode: GenerationMode, data: st.DataObject
) -> None:
    case = data.draw(operation.as_strategy(generation_mode=mode))
    response = await api.request(**_httpx_kwargs(case))
    case.validate_response(response, checks=CHECKS)
