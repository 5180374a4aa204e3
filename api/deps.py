"""Request dependencies: settings, database session, Temporal client, API-key auth."""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from api.keys import ApiKeyPrincipal, Scope, authenticate_key
from models.codec import data_converter
from models.db import session_scope
from settings import Settings


def get_app_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


SettingsDep = Annotated[Settings, Depends(get_app_settings)]


async def get_session(settings: SettingsDep) -> AsyncIterator[AsyncSession]:
    async with session_scope(settings.database_url) as session:
        yield session


# scope="function": the commit happens before the response is sent, so a client that
# got 201 can read what it wrote at once, and a failed commit is never answered 2xx.
SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]


async def connect_temporal(settings: Settings) -> Client:
    """A client that connects on first use, and again on each use until that succeeds: the
    API starts, and stores events, while Temporal is down (``or_defer`` and the 503 handler
    in api/main.py deal with the calls that fail meanwhile)."""
    return await Client.connect(
        settings.temporal_address,
        namespace=settings.temporal_namespace,
        lazy=True,
        data_converter=data_converter(settings),
    )


async def get_temporal(request: Request) -> Client:
    client: Client | None = request.app.state.temporal
    if client is None:
        client = request.app.state.temporal = await connect_temporal(request.app.state.settings)
    return client


TemporalDep = Annotated[Client, Depends(get_temporal)]

_bearer = HTTPBearer(auto_error=False)
_header = APIKeyHeader(name="X-API-Key", auto_error=False)


def _basic_username(request: Request) -> str | None:
    """The username of ``Authorization: Basic``: Segment sends its write key there, with an
    empty password. Read by hand because FastAPI's HTTPBasic answers 401 itself when the
    header holds a Bearer token."""
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic" or not encoded.strip():
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, _, _password = decoded.partition(":")
    return username or None


def presented_key(
    request: Request,
    bearer: HTTPAuthorizationCredentials | None,
    header: str | None,
) -> str | None:
    return bearer.credentials if bearer else header or _basic_username(request)


# The one place that says which scope each /v1 route needs: reads (GET) need ``read``,
# everything else ``write``, except the routes named here (by endpoint function, so a
# path or prefix change cannot move a route to a weaker scope).
ADMIN_MODULES = ("api.routes.api_keys",)
# POSTs that change nothing: a read key may preview and validate.
READ_ONLY_POSTS = frozenset(
    {
        "api.routes.segments.preview_segment",
        "api.routes.journeys.validate_journey",
        "api.routes.templates.preview_template",
    }
)


def required_scope(request: Request) -> Scope:
    endpoint = request.scope.get("endpoint")
    module = getattr(endpoint, "__module__", "")
    name = f"{module}.{getattr(endpoint, '__qualname__', '')}"
    if module in ADMIN_MODULES:
        return Scope.admin
    if request.method in ("GET", "HEAD", "OPTIONS") or name in READ_ONLY_POSTS:
        return Scope.read
    return Scope.write


async def require_api_key(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    header: Annotated[str | None, Depends(_header)],
) -> ApiKeyPrincipal:
    """The caller's key, checked and allowed the route's scope (401 unknown, 403 scope)."""
    given = presented_key(request, bearer, header)
    if not given:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing API key: send 'Authorization: Bearer <key>', 'X-API-Key: <key>' "
            "or HTTP Basic auth with the key as username",
            headers={"WWW-Authenticate": "Bearer"},
        )
    principal = await authenticate_key(session, settings, given)
    if principal is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "invalid API key",
            headers={"WWW-Authenticate": "Bearer"},
        )
    needed = required_scope(request)
    if not principal.allows(needed):
        have = ", ".join(sorted(principal.scopes)) or "none"
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"this API key lacks the {needed.value!r} scope (it has: {have})",
        )
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[ApiKeyPrincipal, Depends(require_api_key)]
