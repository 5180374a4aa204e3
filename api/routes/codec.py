"""The codec server the Temporal UI (and ``temporal --codec-endpoint``) calls to show
workflow payloads: ``POST /codec/decode`` and ``/codec/encode``.

Decrypts only for an operator with an admin API key, sent as ``Authorization: Bearer``
or ``X-API-Key`` (the CLI's ``--codec-auth``, a UI with passAccessToken), or in the path,
``/codec/key/<key>/decode``, for UIs that cannot send headers (the dev server's
``--ui-codec-endpoint``; the run command configures that one). Anyone else gets the
payloads back unchanged: ciphertext. Payloads that are not encrypted come back as they
are. CORS answers the UI origins in ``NURTURE_CODEC_CORS_ORIGINS``.
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Header, HTTPException, Request, Response, status
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from google.protobuf import json_format
from pydantic import BaseModel, ConfigDict, Field
from temporalio.api.common.v1 import Payload

from api.deps import SessionDep, SettingsDep
from api.keys import Scope, authenticate_key
from models.codec import PayloadKeyError, payload_codec
from settings import Settings

router = APIRouter(prefix="/codec", tags=["operations"])

_bearer = HTTPBearer(auto_error=False)
_header = APIKeyHeader(name="X-API-Key", auto_error=False)
ALLOWED_HEADERS = "Content-Type, X-Namespace, Authorization, Authorization-Extras, X-API-Key"


class PayloadJson(BaseModel):
    """A payload in proto3 JSON: metadata values and data are base64."""

    model_config = ConfigDict(extra="forbid")

    metadata: dict[str, str] = Field(default_factory=dict)
    data: str = ""
    externalPayloads: list[dict[str, Any]] | None = None


class CodecBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    payloads: list[PayloadJson] = Field(max_length=10_000)


class CodecResult(BaseModel):
    payloads: list[PayloadJson]


def _origins(settings: Settings) -> set[str]:
    """The configured UI origins, and that of NURTURE_TEMPORAL_UI_URL."""
    ui = urlsplit(settings.temporal_ui_url)
    configured = {o.strip().rstrip("/") for o in settings.codec_cors_origins.split(",")}
    return (configured | {f"{ui.scheme}://{ui.netloc}"}) - {""}


def _cors(request: Request, settings: Settings) -> dict[str, str]:
    origin = request.headers.get("origin", "")
    if origin.rstrip("/") not in _origins(settings):
        return {}
    return {
        "Access-Control-Allow-Origin": origin,
        "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
        "Access-Control-Allow-Headers": ALLOWED_HEADERS,
        "Access-Control-Allow-Credentials": "true",
        "Access-Control-Max-Age": "600",
        "Vary": "Origin",
    }


def _strict_base64(value: str) -> None:
    """Proto3 JSON bytes: standard or URL-safe base64, padding optional; nothing else."""
    normal = value.strip().replace("-", "+").replace("_", "/")
    base64.b64decode(normal + "=" * (-len(normal) % 4), validate=True)


def _parse(body: CodecBody) -> list[Payload]:
    parsed = []
    for index, item in enumerate(body.payloads):
        try:
            for value in [item.data, *item.metadata.values()]:
                _strict_base64(value)
            parsed.append(json_format.ParseDict(item.model_dump(exclude_none=True), Payload()))
        except (binascii.Error, ValueError, json_format.ParseError) as err:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST,
                f"payloads[{index}] is not a Temporal payload (base64 metadata and data): {err}",
            ) from None
    return parsed


def _json(payload: Payload) -> PayloadJson:
    return PayloadJson.model_validate(json_format.MessageToDict(payload))


async def _authorised(
    session: SessionDep,
    settings: Settings,
    path_key: str | None,
    bearer: HTTPAuthorizationCredentials | None,
    header: str | None,
) -> bool:
    given = path_key or (bearer.credentials if bearer else header)
    if not given:
        return False
    principal = await authenticate_key(session, settings, given)
    return principal is not None and principal.allows(Scope.admin)


async def _code(
    direction: Literal["decode", "encode"],
    request: Request,
    body: CodecBody,
    session: SessionDep,
    settings: Settings,
    namespace: str | None,
    path_key: str | None,
    bearer: HTTPAuthorizationCredentials | None,
    header: str | None,
) -> JSONResponse:
    cors = _cors(request, settings)
    if namespace is not None and namespace != settings.temporal_namespace:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"X-Namespace {namespace!r}: this codec server serves namespace "
            f"{settings.temporal_namespace!r}",
            headers=cors,
        )
    payloads = _parse(body)
    codec = payload_codec(settings)
    if codec is not None and await _authorised(session, settings, path_key, bearer, header):
        if direction == "decode":
            decoded = []
            for index, payload in enumerate(payloads):
                try:
                    decoded.append(codec.decrypt(payload))
                except PayloadKeyError as err:
                    raise HTTPException(
                        status.HTTP_422_UNPROCESSABLE_CONTENT,
                        f"payloads[{index}]: {err}",
                        headers=cors,
                    ) from None
            payloads = decoded
        else:
            payloads = await codec.encode(payloads)
    result = CodecResult(payloads=[_json(p) for p in payloads])
    return JSONResponse(result.model_dump(exclude_none=True), headers=cors)


BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
HeaderKeyDep = Annotated[str | None, Depends(_header)]
NamespaceDep = Annotated[str | None, Header(alias="X-Namespace")]
RESPONSES: dict[int | str, dict[str, Any]] = {
    400: {"description": "malformed payloads, or another namespace"},
    422: {"description": "a payload that cannot be decrypted (unknown key id, tampered)"},
}


@router.post("/decode", response_model=CodecResult, responses=RESPONSES)
async def decode(
    request: Request,
    body: CodecBody,
    session: SessionDep,
    settings: SettingsDep,
    bearer: BearerDep,
    header: HeaderKeyDep,
    namespace: NamespaceDep = None,
) -> JSONResponse:
    """Decrypt payloads for an admin key; anyone else gets them back unchanged."""
    return await _code("decode", request, body, session, settings, namespace, None, bearer, header)


@router.post("/encode", response_model=CodecResult, responses=RESPONSES)
async def encode(
    request: Request,
    body: CodecBody,
    session: SessionDep,
    settings: SettingsDep,
    bearer: BearerDep,
    header: HeaderKeyDep,
    namespace: NamespaceDep = None,
) -> JSONResponse:
    """Encrypt payloads (the UI's signal and start forms) for an admin key."""
    return await _code("encode", request, body, session, settings, namespace, None, bearer, header)


@router.post("/key/{key}/decode", response_model=CodecResult, responses=RESPONSES)
async def decode_with_path_key(
    key: str,
    request: Request,
    body: CodecBody,
    session: SessionDep,
    settings: SettingsDep,
    namespace: NamespaceDep = None,
) -> JSONResponse:
    """``/decode`` for UIs that cannot send an Authorization header."""
    return await _code("decode", request, body, session, settings, namespace, key, None, None)


@router.post("/key/{key}/encode", response_model=CodecResult, responses=RESPONSES)
async def encode_with_path_key(
    key: str,
    request: Request,
    body: CodecBody,
    session: SessionDep,
    settings: SettingsDep,
    namespace: NamespaceDep = None,
) -> JSONResponse:
    return await _code("encode", request, body, session, settings, namespace, key, None, None)


async def preflight(request: Request, settings: SettingsDep) -> Response:
    """The browser's CORS preflight: allowed for the configured UI origins only."""
    cors = _cors(request, settings)
    return Response(status_code=204 if cors else 403, headers=cors)


for _path in ("/decode", "/encode", "/key/{key}/decode", "/key/{key}/encode"):
    router.add_api_route(_path, preflight, methods=["OPTIONS"], include_in_schema=False)
