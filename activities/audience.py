"""The audience refresh: lead scores, lifecycle stages and segment membership, kept current.

Work in progress: the full refresh lands with segments and scoring.
"""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime

from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from activities.contacts import snapshot
from models.contracts import ContactSnapshot
from models.tables import Contact, Event, Segment, SegmentMember


@dataclass
class AudienceChanges:
    changed_contacts: set[uuid.UUID] = field(default_factory=set)
    derived_events: list[Event] = field(default_factory=list)


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


async def refresh_audience(
    session: AsyncSession,
    *,
    now: datetime,
    contact_ids: Collection[uuid.UUID] | None = None,
    event_names: Collection[str] | None = None,
    profile_changed: bool = False,
) -> AudienceChanges:
    return AudienceChanges()
