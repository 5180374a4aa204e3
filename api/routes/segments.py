"""Segments: named conditions over contacts, counted and listed in SQL, kept current."""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import APIRouter, HTTPException, Path, Query, Response, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from sqlmodel import col, func, select

from activities.audience import CONDITION, SegmentCycleError, dependency_order
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.services import dispatch_contact_changes
from models.conditions import Condition, inputs_of
from models.conditions_sql import compile_condition
from models.journey import parse_journey
from models.tables import Contact, Journey, JourneyVersion, Segment, SegmentMember, utcnow

router = APIRouter(prefix="/segments", tags=["segments"])

SEGMENT_KEY = r"^[a-z0-9][a-z0-9-]{0,63}$"
SegmentKey = Annotated[str, Path(pattern=SEGMENT_KEY, description="Segment key, [a-z0-9-].")]


class SegmentIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    description: str | None = Field(default=None, max_length=2000)
    condition: dict[str, Any] = Field(
        description="A condition (the journey condition language): attr, event counts within "
        "windows, score_gte, other segments, all/any/not."
    )


class SegmentPublic(BaseModel):
    key: str
    name: str
    description: str | None
    condition: dict[str, Any]
    members: int
    created_at: datetime
    updated_at: datetime
    refreshed_at: datetime | None


class SegmentList(BaseModel):
    segments: list[SegmentPublic]


class MemberPublic(BaseModel):
    contact_id: uuid.UUID
    email: str | None
    external_id: str | None
    entered_at: datetime


class MemberPage(BaseModel):
    members: list[MemberPublic]
    next: str | None = Field(description="Pass as `after` for the next page; null at the end.")


class PreviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    condition: dict[str, Any]


class PreviewResult(BaseModel):
    count: int
    sample: list[uuid.UUID] = Field(description="Up to 10 matching contact ids.")


def _condition(raw: dict[str, Any]) -> Condition:
    """Validate a condition; a 422 names the path of each problem."""
    try:
        json.dumps(raw, allow_nan=False)
    except ValueError:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            "condition: NaN and Infinity are not JSON numbers; use finite numbers",
        ) from None
    try:
        return CONDITION.validate_python(raw)
    except ValidationError as err:
        problems = [
            {
                "field": ".".join(["condition", *(str(p) for p in e["loc"])]),
                "message": e["msg"],
            }
            for e in err.errors()
        ]
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT,
            {"message": "the segment condition is invalid", "errors": problems},
        ) from None


async def _segment(session: SessionDep, key: str) -> Segment:
    segment = (await session.exec(select(Segment).where(Segment.key == key))).first()
    if segment is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no segment with key {key!r}")
    return segment


async def _count(session: SessionDep, segment: Segment) -> int:
    return (
        await session.exec(select(func.count()).where(SegmentMember.segment_id == segment.id))
    ).one()


async def _public(session: SessionDep, segment: Segment) -> SegmentPublic:
    return SegmentPublic(
        key=segment.key,
        name=segment.name,
        description=segment.description,
        condition=segment.condition,
        members=await _count(session, segment),
        created_at=segment.created_at,
        updated_at=segment.updated_at,
        refreshed_at=segment.refreshed_at,
    )


@router.put("/{key}", response_model=SegmentPublic)
async def put_segment(
    key: SegmentKey,
    body: SegmentIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> SegmentPublic:
    """Define (201) or redefine (200) a segment; members are computed at once, and each
    contact entering or leaving is a ``segment_entered`` / ``segment_exited`` event."""
    condition = _condition(body.condition)
    # Serialise definitions, so two concurrent edits cannot build a cycle between them.
    await session.exec(sa.text("SELECT pg_advisory_xact_lock(hashtext('nurture-segments'))"))  # type: ignore[call-overload]
    others = {
        row.key: CONDITION.validate_python(row.condition)
        for row in (await session.exec(select(Segment).where(Segment.key != key))).all()
    }
    try:
        dependency_order({**others, key: condition})
    except SegmentCycleError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, str(err)) from None
    segment = (await session.exec(select(Segment).where(Segment.key == key))).first()
    created = segment is None
    if segment is None:
        segment = Segment(key=key, name=body.name)
    segment.name = body.name
    segment.description = body.description
    segment.condition = condition.model_dump(by_alias=True, exclude_none=True)
    segment.updated_at = utcnow()
    session.add(segment)
    await session.commit()
    await dispatch_contact_changes(session, temporal, settings, None)
    await session.refresh(segment)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return await _public(session, segment)


@router.get("", response_model=SegmentList)
async def list_segments(session: SessionDep) -> SegmentList:
    segments = (await session.exec(select(Segment).order_by(Segment.key))).all()
    return SegmentList(segments=[await _public(session, s) for s in segments])


@router.get("/{key}", response_model=SegmentPublic)
async def get_segment(key: SegmentKey, session: SessionDep) -> SegmentPublic:
    return await _public(session, await _segment(session, key))


@router.get("/{key}/members", response_model=MemberPage)
async def list_members(
    key: SegmentKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[uuid.UUID | None, Query(description="`next` of the previous page")] = None,
) -> MemberPage:
    """Members in contact-id order, a page at a time (keyset paging: stable and fast)."""
    segment = await _segment(session, key)
    query = (
        select(
            SegmentMember.contact_id, Contact.email, Contact.external_id, SegmentMember.entered_at
        )
        .join(Contact, Contact.id == SegmentMember.contact_id)  # type: ignore[arg-type]
        .where(SegmentMember.segment_id == segment.id)
        .order_by(col(SegmentMember.contact_id))
        .limit(limit + 1)
    )
    if after is not None:
        query = query.where(col(SegmentMember.contact_id) > after)
    rows = (await session.exec(query)).all()
    members = [
        MemberPublic(contact_id=r[0], email=r[1], external_id=r[2], entered_at=r[3])
        for r in rows[:limit]
    ]
    more = len(rows) > limit
    return MemberPage(members=members, next=str(members[-1].contact_id) if more else None)


@router.post("/preview", response_model=PreviewResult)
async def preview_segment(body: PreviewIn, session: SessionDep) -> PreviewResult:
    """Count the contacts a condition matches now, without saving anything."""
    condition = _condition(body.condition)
    contacts: Any = Contact.__table__  # type: ignore[attr-defined]
    where = [
        contacts.c.erased_at.is_(None),
        contacts.c.merged_into.is_(None),
        compile_condition(condition, now=utcnow()),
    ]
    count = (
        await (await session.connection()).execute(
            sa.select(sa.func.count()).select_from(contacts).where(*where)
        )
    ).scalar_one()
    sample = (
        (
            await (await session.connection()).execute(
                sa.select(contacts.c.id).where(*where).order_by(contacts.c.id).limit(10)
            )
        )
        .scalars()
        .all()
    )
    return PreviewResult(count=count, sample=list(sample))


@router.delete("/{key}", status_code=status.HTTP_204_NO_CONTENT)
async def delete_segment(key: SegmentKey, session: SessionDep) -> None:
    """Delete a segment no other segment and no published journey names (else 409)."""
    segment = await _segment(session, key)
    users = [
        f"segment {row.key!r}"
        for row in (await session.exec(select(Segment).where(Segment.key != key))).all()
        if key in inputs_of(CONDITION.validate_python(row.condition)).segments
    ]
    versions = (
        await session.exec(
            select(Journey.key, JourneyVersion.document)
            .join(JourneyVersion, JourneyVersion.journey_id == Journey.id)  # type: ignore[arg-type]
            .where(JourneyVersion.version == Journey.current_version)
        )
    ).all()
    users += [
        f"journey {journey_key!r}"
        for journey_key, document in versions
        if key in parse_journey(document).segments()
    ]
    if users:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"segment {key!r} is used by " + ", ".join(users)
        )
    await session.delete(segment)
