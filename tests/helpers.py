"""Small helpers that set up journeys, templates and contacts through the real API."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import httpx
import yaml

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def put_template(api: httpx.AsyncClient, key: str, **fields: Any) -> None:
    body = {"channel": "email", "subject": "Hello {{ contact.first_name }}", "html": "<p>Hi</p>"}
    response = await api.put(f"/v1/templates/{key}", json={**body, **fields})
    assert response.status_code in (200, 201), response.text


async def load_example_templates(api: httpx.AsyncClient) -> None:
    for path in sorted((EXAMPLES / "templates").glob("*.yaml")):
        response = await api.put(
            f"/v1/templates/{path.stem}", json=yaml.safe_load(path.read_text())
        )
        assert response.status_code in (200, 201), response.text


async def publish(api: httpx.AsyncClient, document: dict[str, Any]) -> dict[str, Any]:
    response = await api.post("/v1/journeys", json=document)
    assert response.status_code == 201, response.text
    response = await api.post(f"/v1/journeys/{document['key']}/publish")
    assert response.status_code == 201, response.text
    return dict(response.json())


async def contact(api: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"email": f"{unique('ada')}@example.com", **fields}
    response = await api.post("/v1/contacts", json=body)
    assert response.status_code in (200, 201), response.text
    return dict(response.json()["contact"])


async def enroll(
    api: httpx.AsyncClient, journey: str, contact_id: str, **extra: Any
) -> dict[str, Any]:
    response = await api.post(
        f"/v1/journeys/{journey}/enrollments", json={"contact_id": contact_id, **extra}
    )
    assert response.status_code in (200, 201), response.text
    return dict(response.json())


async def wait_for_step(
    api: httpx.AsyncClient, enrollment_id: str, step: str, seconds: float = 20
) -> dict[str, Any]:
    """Poll the enrollment (read from the workflow) until it sits at ``step``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        response = await api.get(f"/v1/enrollments/{enrollment_id}")
        if response.status_code == 200 and response.json()["current_step"] == step:
            return dict(response.json())
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"enrollment never reached step {step!r}: {response.text}")
        await asyncio.sleep(0.1)
