"""Broadcasts: a one-time send of a template to a segment, now, at a moment, or at the
same local time in each contact's zone, at a set rate; paused, resumed and cancelled
mid-send. Run by BroadcastWorkflow (workflows/broadcast.py)."""

from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Annotated, Literal

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, status
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from sqlmodel import col, select
from temporalio.client import WorkflowQueryFailedError
from temporalio.service import RPCError, RPCStatusCode

from api.deps import SessionDep, SettingsDep, TemporalDep
from models.campaigns import (
    BroadcastControl,
    BroadcastInput,
    BroadcastProgress,
    broadcast_workflow_id,
)
from models.journey import KEY_PATTERN, check_timezone
from models.tables import (
    Broadcast,
    BroadcastStatus,
    MessageChannel,
    Segment,
    Template,
    utcnow,
)
from workflows.broadcast import BroadcastWorkflow

router = APIRouter(prefix="/broadcasts", tags=["broadcasts"])

BroadcastKey = Annotated[str, Path(pattern=KEY_PATTERN, description="Broadcast key, [a-z0-9-].")]
MAX_RATE_PER_SECOND = 10_000


class Rate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    count: int = Field(ge=1, le=600_000)
    per: Literal["second", "minute"] = "second"

    @property
    def per_second(self) -> float:
        return self.count / (1 if self.per == "second" else 60)


class BroadcastIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    key: str = Field(pattern=KEY_PATTERN)
    name: str | None = Field(default=None, max_length=200)
    template: str = Field(pattern=KEY_PATTERN)
    segment: str = Field(pattern=KEY_PATTERN)
    channel: Literal["email", "sms"] | None = None  # default: the template's channel
    send_at: datetime | None = None  # with an offset; omitted: now
    # A local date-time without offset ("2026-12-01T09:00"): sent at that wall-clock time
    # in each contact's zone (else default_timezone, else UTC).
    local_time: str | None = None
    default_timezone: str | None = None
    rate: Rate = Rate(count=10)
    # Most sends in one go; default one second's worth of the rate (at least 1).
    burst: int | None = Field(default=None, ge=1, le=10_000)
    error_policy: Literal["skip", "pause"] = "skip"

    @field_validator("send_at")
    @classmethod
    def _aware(cls, value: datetime | None) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError(
                "send_at needs an offset (2026-12-01T09:00:00Z); for the same local time in "
                "each contact's zone use local_time"
            )
        return value

    @field_validator("local_time")
    @classmethod
    def _local(cls, value: str | None) -> str | None:
        if value is None:
            return None
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(
                f"local_time {value!r}: use an ISO date-time like 2026-12-01T09:00"
            ) from None
        if parsed.tzinfo is not None:
            raise ValueError("local_time is a wall-clock time: give it without an offset")
        return parsed.isoformat()

    @field_validator("default_timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return check_timezone(value)

    @model_validator(mode="after")
    def _one_moment(self) -> BroadcastIn:
        if self.send_at is not None and self.local_time is not None:
            raise ValueError("give send_at (one moment) or local_time (each contact's), not both")
        if self.rate.per_second > MAX_RATE_PER_SECOND:
            raise ValueError(f"rate: at most {MAX_RATE_PER_SECOND} a second")
        return self


class BroadcastPublic(BaseModel):
    id: uuid.UUID
    key: str
    name: str
    template: str
    segment: str
    channel: str
    send_at: datetime | None
    local_time: str | None
    default_timezone: str | None
    rate_per_second: float
    burst: int
    error_policy: str
    status: str
    status_reason: str | None
    workflow_id: str
    total: int | None
    sent: int
    skipped: int
    failed: int
    pending: int | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    live: BroadcastProgress | None = None  # the workflow's own view while it runs


class ControlIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=500)


def _unprocessable(message: str) -> HTTPException:
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


async def _public(
    session: SessionDep, broadcast: Broadcast, temporal: TemporalDep | None = None
) -> BroadcastPublic:
    live = None
    if temporal is not None and broadcast.status not in (
        BroadcastStatus.completed,
        BroadcastStatus.cancelled,
        BroadcastStatus.failed,
    ):
        try:
            live = await temporal.get_workflow_handle(broadcast.workflow_id).query(
                BroadcastWorkflow.progress_view
            )
        except (RPCError, WorkflowQueryFailedError):
            live = None
    done = broadcast.sent + broadcast.skipped + broadcast.failed
    return BroadcastPublic(
        id=broadcast.id,
        key=broadcast.key,
        name=broadcast.name,
        template=broadcast.template_key,
        segment=broadcast.segment_key,
        channel=broadcast.channel,
        send_at=broadcast.send_at,
        local_time=broadcast.local_time,
        default_timezone=broadcast.default_timezone,
        rate_per_second=broadcast.rate_per_second,
        burst=broadcast.burst,
        error_policy=broadcast.error_policy,
        status=broadcast.status,
        status_reason=broadcast.status_reason,
        workflow_id=broadcast.workflow_id,
        total=broadcast.total,
        sent=broadcast.sent,
        skipped=broadcast.skipped,
        failed=broadcast.failed,
        pending=None if broadcast.total is None else broadcast.total - done,
        created_at=broadcast.created_at,
        started_at=broadcast.started_at,
        finished_at=broadcast.finished_at,
        live=live,
    )


async def _broadcast(session: SessionDep, key: str) -> Broadcast:
    broadcast = (await session.exec(select(Broadcast).where(Broadcast.key == key))).first()
    if broadcast is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no broadcast with key {key!r}")
    return broadcast


@router.post("", response_model=BroadcastPublic, status_code=status.HTTP_201_CREATED)
async def create_broadcast(
    body: BroadcastIn, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> BroadcastPublic:
    """Send ``template`` to ``segment``'s members: now, at ``send_at``, or at ``local_time``
    in each contact's zone; at most ``rate`` (plus ``burst``) messages."""
    if (await session.exec(select(Broadcast.id).where(Broadcast.key == body.key))).first():
        raise HTTPException(status.HTTP_409_CONFLICT, f"key: broadcast {body.key!r} exists")
    template = (await session.exec(select(Template).where(Template.key == body.template))).first()
    if template is None:
        raise _unprocessable(f"template: no template with key {body.template!r}")
    channel = body.channel or template.channel
    if template.channel != channel:
        raise _unprocessable(
            f"template: {body.template!r} is for {template.channel}, not {channel}"
        )
    if (await session.exec(select(Segment.id).where(Segment.key == body.segment))).first() is None:
        raise _unprocessable(f"segment: no segment with key {body.segment!r}")
    if body.send_at is not None and body.send_at < utcnow():
        raise _unprocessable(
            f"send_at: {body.send_at.isoformat()} is in the past; omit send_at to send now"
        )
    burst = body.burst or max(1, math.ceil(body.rate.per_second))
    broadcast_id = uuid.uuid4()
    broadcast = Broadcast(
        id=broadcast_id,
        key=body.key,
        name=body.name or body.key,
        template_key=body.template,
        segment_key=body.segment,
        channel=MessageChannel(channel),
        send_at=body.send_at,
        local_time=body.local_time,
        default_timezone=body.default_timezone,
        rate_per_second=body.rate.per_second,
        burst=burst,
        error_policy=body.error_policy,
        status=BroadcastStatus.scheduled,
        workflow_id=broadcast_workflow_id(str(broadcast_id)),
    )
    session.add(broadcast)
    await session.commit()
    try:
        await temporal.start_workflow(
            BroadcastWorkflow.run,
            BroadcastInput(
                broadcast_id=str(broadcast_id),
                send_at=body.send_at.isoformat() if body.send_at else None,
                local_time=body.local_time,
                rate_per_second=broadcast.rate_per_second,
                burst=burst,
                error_policy=body.error_policy,
            ),
            id=broadcast.workflow_id,
            task_queue=settings.task_queue,
            static_summary=f"Broadcast '{body.key}': template {body.template} to segment "
            f"{body.segment}",
        )
    except BaseException:
        await (await session.connection()).execute(
            sa.delete(Broadcast).where(col(Broadcast.id) == broadcast_id)
        )
        await session.commit()
        raise
    await session.refresh(broadcast)
    return await _public(session, broadcast)


@router.get("", response_model=list[BroadcastPublic])
async def list_broadcasts(
    session: SessionDep,
    status_filter: Annotated[
        BroadcastStatus | None, Query(alias="status", description="Only this status.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[BroadcastPublic]:
    """Broadcasts, newest first."""
    query = select(Broadcast).order_by(col(Broadcast.created_at).desc()).limit(limit)
    if status_filter is not None:
        query = query.where(Broadcast.status == status_filter)
    return [await _public(session, b) for b in (await session.exec(query)).all()]


@router.get("/{key}", response_model=BroadcastPublic)
async def get_broadcast(
    key: BroadcastKey, session: SessionDep, temporal: TemporalDep
) -> BroadcastPublic:
    """A broadcast with its progress (stored counts; the workflow's view while it runs)."""
    return await _public(session, await _broadcast(session, key), temporal)


async def _signal(
    temporal: TemporalDep, broadcast: Broadcast, name: str, reason: str | None
) -> None:
    try:
        await temporal.get_workflow_handle(broadcast.workflow_id).signal(
            name, BroadcastControl(reason)
        )
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"broadcast {broadcast.key!r} is no longer running"
        ) from None


@router.post("/{key}/pause", response_model=BroadcastPublic)
async def pause_broadcast(
    key: BroadcastKey, session: SessionDep, temporal: TemporalDep, body: ControlIn | None = None
) -> BroadcastPublic:
    """Stop sending after the batch under way; nothing is lost, ``resume`` goes on."""
    broadcast = await _broadcast(session, key)
    await session.refresh(broadcast, with_for_update=True)
    if broadcast.status not in (
        BroadcastStatus.scheduled,
        BroadcastStatus.sending,
        BroadcastStatus.paused,
    ):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"broadcast {key!r} is {broadcast.status}; it cannot pause"
        )
    reason = (body.reason if body else None) or "paused by an operator"
    await _signal(temporal, broadcast, "pause", reason)
    broadcast.status, broadcast.status_reason = BroadcastStatus.paused, reason
    session.add(broadcast)
    await session.commit()
    return await _public(session, broadcast)


@router.post("/{key}/resume", response_model=BroadcastPublic)
async def resume_broadcast(
    key: BroadcastKey, session: SessionDep, temporal: TemporalDep
) -> BroadcastPublic:
    """Go on sending where the broadcast stopped."""
    broadcast = await _broadcast(session, key)
    await session.refresh(broadcast, with_for_update=True)
    if broadcast.status != BroadcastStatus.paused:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"broadcast {key!r} is {broadcast.status}, not paused"
        )
    await _signal(temporal, broadcast, "resume", None)
    broadcast.status = (
        BroadcastStatus.sending if broadcast.started_at else BroadcastStatus.scheduled
    )
    broadcast.status_reason = None
    session.add(broadcast)
    await session.commit()
    return await _public(session, broadcast)


@router.post("/{key}/cancel", response_model=BroadcastPublic)
async def cancel_broadcast(
    key: BroadcastKey, session: SessionDep, temporal: TemporalDep
) -> BroadcastPublic:
    """Send nothing more; what was sent stays sent."""
    broadcast = await _broadcast(session, key)
    await session.refresh(broadcast, with_for_update=True)
    if broadcast.status in (
        BroadcastStatus.completed,
        BroadcastStatus.cancelled,
        BroadcastStatus.failed,
    ):
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"broadcast {key!r} is already {broadcast.status}"
        )
    try:
        await temporal.get_workflow_handle(broadcast.workflow_id).cancel()
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
    broadcast.status, broadcast.finished_at = BroadcastStatus.cancelled, utcnow()
    broadcast.status_reason = "cancelled by an operator"
    session.add(broadcast)
    await session.commit()
    return await _public(session, broadcast)
