"""The error answers every operation may give, added to the OpenAPI schema in one place.

Routes document their own success answers and the errors particular to them (409, 415,
302...); the errors that come from shared machinery are added here: the input guard
(400, 413), validation and values PostgreSQL refuses (422), the database or Temporal
being down (503), the API key (401, 403) on /v1, unknown path ids (404), rate limits (429).
Schemathesis (tests/test_schemathesis.py) holds the app to this schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR = {
    "title": "Error",
    "type": "object",
    "properties": {
        "detail": {
            "description": "What is wrong: a message, or a list or object naming the fields.",
        }
    },
    "required": ["detail"],
}
ERROR_REF = {"$ref": "#/components/schemas/Error"}

ALL = {
    "400": "Malformed body: not UTF-8, nested too deep, NaN or Infinity, not parseable",
    "413": "Body over NURTURE_MAX_BODY_BYTES",
    "422": "A field is missing, unknown or invalid, or a value cannot be stored",
    "503": "The database or Temporal is unavailable; retry after Retry-After seconds",
}
KEYED = {
    "401": "No API key, or an unknown or revoked one",
    "403": "The API key lacks the scope this operation needs",
}
RATE_LIMITED = {"429": "Too many requests from this address or for this link (Retry-After)"}
RATE_LIMITED_PREFIXES = ("/t/", "/u/")
SIGNED = {"403": "The provider's signature is missing, wrong or stale"}
SIGNED_PREFIXES = ("/webhooks/sendgrid", "/webhooks/twilio")


# Operations whose success has two codes (created or already there, stored or duplicate):
# (method, path) -> (the documented code, the other one), with the same body.
ALTERNATE_SUCCESS = {
    ("post", "/v1/contacts"): ("200", "201"),
    ("put", "/v1/segments/{key}"): ("200", "201"),
    ("put", "/v1/templates/{key}"): ("200", "201"),
    ("post", "/v1/journeys/{key}/enrollments"): ("200", "201"),
    ("post", "/v1/events"): ("202", "200"),
    ("post", "/webhooks/forms/{form}"): ("202", "200"),
}
# Answers that are not JSON.
OTHER_SUCCESS: dict[tuple[str, str], dict[str, Any]] = {
    ("get", "/t/o/{token}.gif"): {
        "200": {
            "description": "A 1x1 transparent GIF, whatever the token",
            "content": {"image/gif": {"schema": {"type": "string", "format": "binary"}}},
        }
    },
    ("get", "/t/c/{token}"): {
        "302": {
            "description": "Redirect to the signed URL",
            "headers": {"Location": {"schema": {"type": "string"}}},
        }
    },
}
CONFLICT = {"409": "Conflicts with stored state (taken, in use, or not in a state for this)"}
MEDIA_TYPE = {"415": "Unsupported Content-Type"}


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": ERROR_REF}},
    }


def _add_errors(method: str, path: str, operation: dict[str, Any]) -> None:
    responses: dict[str, Any] = operation.setdefault("responses", {})
    if (method, path) in ALTERNATE_SUCCESS:
        documented, other = ALTERNATE_SUCCESS[(method, path)]
        responses.setdefault(other, {**responses[documented], "description": "Also success"})
    if (method, path) in OTHER_SUCCESS:
        responses.pop("200", None)
        responses.update(OTHER_SUCCESS[(method, path)])
    wanted = dict(ALL)
    if path.startswith("/v1/") and method != "get":
        wanted |= CONFLICT
    if "requestBody" in operation and len(operation["requestBody"].get("content", {})) > 1:
        wanted |= MEDIA_TYPE
    if path.startswith("/v1/"):
        # /v1 operations also answer 404 for a resource a body or query names.
        wanted |= KEYED | {"404": "No such resource"}
    if path.startswith(SIGNED_PREFIXES):
        wanted |= SIGNED
    if path.startswith(RATE_LIMITED_PREFIXES):
        wanted |= RATE_LIMITED
    if "{" in path:
        wanted["404"] = "No such resource"
    for code, description in wanted.items():
        existing = responses.get(code)
        if existing is None:
            responses[code] = _error(description)
            continue
        # FastAPI documents 422 as its validation error list; ours may also be a message.
        for media in existing.setdefault("content", {"application/json": {}}).values():
            schema = media.get("schema")
            media["schema"] = {"anyOf": [schema, ERROR_REF]} if schema else ERROR_REF


def document_errors(app: FastAPI) -> None:
    """Make ``app.openapi()`` include the shared error answers."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title,
            version=app.version,
            description=app.description,
            routes=app.routes,
        )
        schema.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                _add_errors(method, path, operation)
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
