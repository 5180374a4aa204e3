"""The Nurture REST API (v1). OpenAPI at /docs."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import psycopg
import sqlalchemy.exc
from fastapi import APIRouter, Depends, FastAPI, Request, status
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy import text
from temporalio.client import Client
from temporalio.service import RPCError

from activities.delivery import temporal_unavailable
from api import dashboard
from api.deps import SessionDep, connect_temporal, require_api_key
from api.guard import InputGuard
from api.openapi import document_errors
from api.routes import (
    analytics,
    api_keys,
    broadcasts,
    bulk_enrollments,
    codec,
    contacts,
    enrollments,
    events,
    forms,
    journeys,
    prometheus,
    scoring,
    segment_spec,
    segments,
    splits,
    templates,
    tracking,
    unsubscribe,
    webhooks,
)
from settings import Settings, get_settings

log = logging.getLogger(__name__)
RETRY_AFTER_SECONDS = 5
# What a lost or refused database connection raises: a retry later may well succeed.
DATABASE_DOWN = (
    sqlalchemy.exc.OperationalError,
    sqlalchemy.exc.InterfaceError,
    sqlalchemy.exc.TimeoutError,
    psycopg.OperationalError,
    ConnectionRefusedError,
)


def _unavailable(detail: str) -> JSONResponse:
    return JSONResponse(
        {"detail": detail},
        status.HTTP_503_SERVICE_UNAVAILABLE,
        headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
    )


async def _database_down(request: Request, err: Exception) -> JSONResponse:
    # A 503 makes webhook providers and SDKs retry; a 500 may make them give up.
    log.warning("database unavailable for %s %s: %s", request.method, request.url.path, err)
    return _unavailable("database unavailable, retry later")


async def _temporal_down(request: Request, err: Exception) -> JSONResponse:
    """Routes that need Temporal to answer (enrollments, journey status) when it is down;
    routes that store events acknowledge them without it (``or_defer``)."""
    if not temporal_unavailable(err):
        raise err
    log.warning("Temporal unavailable for %s %s: %s", request.method, request.url.path, err)
    return _unavailable("Temporal unavailable, retry later")


async def _unstorable_value(request: Request, err: Exception) -> JSONResponse:
    """A value PostgreSQL refuses (a NUL character, a lone surrogate, a number out of
    range): the client's data, so a 422 and nothing stored (the session rolled back)."""
    cause = getattr(err, "orig", None) or err
    diag = getattr(cause, "diag", None)
    reason = str(cause).splitlines()[0]
    if diag is not None and diag.message_primary:
        # PostgreSQL's detail names the value ('Token "NaN" is invalid.').
        reason = " ".join(filter(None, (diag.message_primary, diag.message_detail)))
    log.info("refused a value for %s %s: %s", request.method, request.url.path, reason)
    return JSONResponse(
        {"detail": f"a value in the request cannot be stored: {reason}"},
        status.HTTP_422_UNPROCESSABLE_CONTENT,
    )


def create_app(settings: Settings | None = None, temporal: Client | None = None) -> FastAPI:
    """Build the app; pass ``temporal`` to share a client (tests), else it makes one that
    connects on first use, so the API starts (and stores events) while Temporal is down."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_key:
            raise RuntimeError("NURTURE_API_KEY is not set: the API refuses to start without a key")
        if app.state.temporal is None:
            app.state.temporal = await connect_temporal(settings)
        yield

    app = FastAPI(
        title="Nurture",
        version="1",
        description="Durable, multi-channel nurture journeys on Temporal.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.temporal = temporal
    # Oversized, deeply nested and non-UTF-8 bodies are refused before any route reads them.
    app.add_middleware(InputGuard, settings=settings)
    for database_error in DATABASE_DOWN:
        app.add_exception_handler(database_error, _database_down)
    for data_error in (sqlalchemy.exc.DataError, psycopg.DataError):
        app.add_exception_handler(data_error, _unstorable_value)
    for temporal_error in (RPCError, RuntimeError):
        app.add_exception_handler(temporal_error, _temporal_down)

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    for module in (contacts, events, journeys, enrollments, templates, segments, scoring):
        v1.include_router(module.router)
    v1.include_router(splits.router)  # A/B winner tests: /v1/journeys/{key}/splits/{step}
    # Key management (admin scope, see api/deps.py ADMIN_ROUTES).
    v1.include_router(api_keys.router)
    # Campaigns: bulk enrollment (and its schedules) and broadcasts.
    v1.include_router(bulk_enrollments.router)
    v1.include_router(broadcasts.router)
    # Segment-spec calls (/v1/batch, /v1/track...), authenticated by the key as write key.
    v1.include_router(segment_spec.router)
    v1.include_router(analytics.router)
    app.include_router(v1)
    # The dashboard logs in with the API key and keeps a signed session cookie.
    app.include_router(dashboard.router)
    app.mount("/static", StaticFiles(directory=dashboard.STATIC_DIR), name="static")
    # Operators' Prometheus scrape, open like /healthz (restrict it at the network edge).
    app.include_router(prometheus.router)
    # Provider webhooks are authenticated by the providers' signatures, not the API key.
    app.include_router(webhooks.router)
    # Websites post form fills directly, with no key to hide.
    app.include_router(forms.router)
    # Unsubscribe links in mail are authenticated by their signed token, not the API key.
    app.include_router(unsubscribe.router)
    app.include_router(tracking.router)
    # The Temporal UI's codec server: decrypts for admin keys only (api/routes/codec.py).
    app.include_router(codec.router)

    @app.get("/healthz", tags=["operations"])
    async def healthz(session: SessionDep) -> dict[str, str]:
        await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return {"status": "ok"}

    document_errors(app)
    return app
