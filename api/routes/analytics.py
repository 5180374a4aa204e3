"""Metrics of journeys (per version, step and A/B variant), of broadcasts (per channel), and
segment sizes over time."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel
from sqlmodel import select

from api.analytics import (
    MessageFilter,
    breakdown,
    journey_report,
    message_metrics,
    message_summary,
    segment_sizes,
)
from api.deps import SessionDep
from api.routes.journeys import JourneyKey
from api.routes.segments import SegmentKey
from api.services import get_journey
from models.tables import Broadcast, JourneyVersion, Segment

router = APIRouter(tags=["analytics"])


class JourneyMetrics(BaseModel):
    """Counts and rates; see the README's Analytics section for each definition."""

    journey: str
    version: int | None
    enrollments: dict[str, Any]
    messages: dict[str, Any]
    by_version: list[dict[str, Any]]
    by_step: list[dict[str, Any]]
    by_variant: list[dict[str, Any]]


class BroadcastMetrics(BaseModel):
    """The same message counts and rates as a journey's, for one broadcast's sends."""

    broadcast: str
    messages: dict[str, Any]
    by_channel: list[dict[str, Any]]


class SegmentSizePoint(BaseModel):
    measured_at: datetime
    size: int


class SegmentSizes(BaseModel):
    segment: str
    sizes: list[SegmentSizePoint]


@router.get("/journeys/{key}/metrics", response_model=JourneyMetrics)
async def journey_metrics(
    key: JourneyKey,
    session: SessionDep,
    version: Annotated[int | None, Query(ge=1, description="Only this version.")] = None,
) -> JourneyMetrics:
    """Enrolled, active, completed, exited, conversions (goal reached), conversion rate,
    median time to conversion, revenue; messages sent, delivered, opened, clicked, bounced,
    complained, unsubscribed with rates; totals and per version, step and variant."""
    journey = await get_journey(session, key)
    if version is not None:
        known = (
            await session.exec(
                select(JourneyVersion.id).where(
                    JourneyVersion.journey_id == journey.id, JourneyVersion.version == version
                )
            )
        ).first()
        if known is None:
            raise HTTPException(
                status.HTTP_404_NOT_FOUND, f"version: journey {key!r} has no version {version}"
            )
    report = await journey_report(session, journey.id, version)
    return JourneyMetrics(journey=key, version=version, **report)


@router.get("/broadcasts/{key}/metrics", response_model=BroadcastMetrics)
async def broadcast_metrics(
    key: Annotated[str, Path(min_length=1, max_length=64)], session: SessionDep
) -> BroadcastMetrics:
    """Sent, delivered, opened, clicked, bounced, complained, unsubscribed, failed and
    skipped (suppressed, capped) with rates, in all and per channel."""
    broadcast = (await session.exec(select(Broadcast).where(Broadcast.key == key))).first()
    if broadcast is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no broadcast with key {key!r}")
    rows = await message_metrics(session, MessageFilter(broadcast_id=broadcast.id), ["channel"])
    totals = next((r for r in rows if not r.key), None)
    return BroadcastMetrics(
        broadcast=key,
        messages=message_summary(totals),
        by_channel=[{**r.key, **message_summary(r)} for r in breakdown(rows, "channel")],
    )


@router.get("/segments/{key}/sizes", response_model=SegmentSizes)
async def segment_size_history(
    key: SegmentKey,
    session: SessionDep,
    since: Annotated[datetime | None, Query(description="Only sizes measured since.")] = None,
    limit: Annotated[int, Query(ge=1, le=5000)] = 500,
) -> SegmentSizes:
    """The segment's size at each full audience refresh (oldest first)."""
    if since is not None and since.tzinfo is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "since: give a time zone (e.g. Z or +00:00)"
        )
    segment = (await session.exec(select(Segment).where(Segment.key == key))).first()
    if segment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no segment with key {key!r}")
    points = await segment_sizes(session, segment.id, since, limit)
    return SegmentSizes(
        segment=key, sizes=[SegmentSizePoint(measured_at=t, size=n) for t, n in points]
    )
