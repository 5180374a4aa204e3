"""What conditions, templates and journeys see of a contact."""

from __future__ import annotations

import uuid

from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession

from models.contracts import ContactSnapshot
from models.tables import Contact, Segment, SegmentMember


def snapshot(contact: Contact) -> ContactSnapshot:
    return ContactSnapshot(
        id=str(contact.id),
        email=contact.email,
        phone=contact.phone,
        external_id=contact.external_id,
        timezone=contact.timezone,
        lifecycle_stage=contact.lifecycle_stage,
        score=contact.score,
        tags=list(contact.tags),
        attributes=dict(contact.attributes),
    )


async def contact_snapshot(session: AsyncSession, contact: Contact) -> ContactSnapshot:
    """What conditions and templates see of a contact, with the segments it is in."""
    keys = (
        await session.exec(
            select(Segment.key)
            .join(SegmentMember, SegmentMember.segment_id == Segment.id)  # type: ignore[arg-type]
            .where(SegmentMember.contact_id == contact.id)
            .order_by(Segment.key)
        )
    ).all()
    view = snapshot(contact)
    view.segments = list(keys)
    return view


async def contact_snapshots(
    session: AsyncSession, contacts: list[Contact], *, with_segments: bool
) -> dict[uuid.UUID, ContactSnapshot]:
    """``contact_snapshot`` for many contacts in one query (segments only when asked)."""
    views = {contact.id: snapshot(contact) for contact in contacts}
    if with_segments and views:
        rows = (
            await session.exec(
                select(SegmentMember.contact_id, Segment.key)
                .join(Segment, SegmentMember.segment_id == Segment.id)  # type: ignore[arg-type]
                .where(col(SegmentMember.contact_id).in_(list(views)))
                .order_by(Segment.key)
            )
        ).all()
        for contact_id, key in rows:
            views[contact_id].segments.append(key)
    return views
