"""The Nurture REST API (v1). OpenAPI at /docs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from sqlalchemy import text
from temporalio.client import Client

from api.deps import SessionDep, require_api_key
from api.routes import (
    contacts,
    enrollments,
    events,
    forms,
    journeys,
    scoring,
    segment_spec,
    segments,
    templates,
    tracking,
    unsubscribe,
    webhooks,
)
from settings import Settings, get_settings


def create_app(settings: Settings | None = None, temporal: Client | None = None) -> FastAPI:
    """Build the app; pass ``temporal`` to share a client (tests), else it connects at start."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not settings.api_key:
            raise RuntimeError("NURTURE_API_KEY is not set: the API refuses to start without a key")
        if app.state.temporal is None:
            app.state.temporal = await Client.connect(
                settings.temporal_address, namespace=settings.temporal_namespace
            )
        yield

    app = FastAPI(
        title="Nurture",
        version="1",
        description="Durable, multi-channel nurture journeys on Temporal.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.temporal = temporal

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)])
    for module in (contacts, events, journeys, enrollments, templates, segments, scoring):
        v1.include_router(module.router)
    # Segment-spec calls (/v1/batch, /v1/track...), authenticated by the key as write key.
    v1.include_router(segment_spec.router)
    app.include_router(v1)
    # Provider webhooks are authenticated by the providers' signatures, not the API key.
    app.include_router(webhooks.router)
    # Websites post form fills directly, with no key to hide.
    app.include_router(forms.router)
    # Unsubscribe links in mail are authenticated by their signed token, not the API key.
    app.include_router(unsubscribe.router)
    app.include_router(tracking.router)

    @app.get("/healthz", tags=["operations"])
    async def healthz(session: SessionDep) -> dict[str, str]:
        await session.exec(text("SELECT 1"))  # type: ignore[call-overload]
        return {"status": "ok"}

    return app
