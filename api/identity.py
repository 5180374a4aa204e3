"""Who a call is about: identify contacts by user id, email or anonymous id, and merge an
anonymous visitor (or an aliased identity) into the identified contact.

Shared by the Segment-spec endpoints and website form fills. Everything here works in the
caller's transaction; the caller commits, then calls ``end_merged_runs`` and dispatches.

Merging ``source`` into ``target``:
- the source's events move to the target (``UPDATE events SET contact_id``);
- attributes merge with the target's values winning; tags are joined; the target keeps
  its own email, phone and time zone and takes the source's only where it has none;
- the target keeps its own ``anonymous_id`` and takes the source's only when it has none.
  The source keeps its ``anonymous_id`` and becomes a tombstone (``merged_into`` = target,
  no email or external id), so a later call with that anonymous id still finds the target;
- the source's active enrollments end (status ``exited``, exit reason ``merged``); their
  workflows are terminated after the commit by ``end_merged_runs``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import delete, text
from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Event,
    SegmentMember,
    utcnow,
)

log = logging.getLogger(__name__)

MERGED = "merged"


@dataclass
class Resolution:
    """The live contact a call is about, and what resolving it changed."""

    contact: Contact
    created: bool = False
    # Set when the contact's identity or profile changed (journeys are told after commit).
    changed: bool = False
    conflict: str | None = None


@dataclass
class IdentityWork:
    """What a transaction's identity changes leave for after the commit."""

    touched: set[uuid.UUID] = field(default_factory=set)
    tombstones: set[uuid.UUID] = field(default_factory=set)
    runs_to_end: list[tuple[str, str | None]] = field(default_factory=list)
    contacts_created: int = 0
    merges: int = 0


async def lock_identities(session: AsyncSession, keys: Iterable[str]) -> None:
    """Serialise transactions about the same identities, so two concurrent first calls
    for one anonymous id (not unique in the schema) make one contact, not two.

    Every key is locked up front in sorted order: two batches never wait on each other
    in a cycle.
    """
    for key in sorted(set(keys)):
        await session.exec(  # type: ignore[call-overload]
            text("SELECT pg_advisory_xact_lock(hashtextextended(:key, 0))").bindparams(key=key)
        )


def _live(query: Any) -> Any:
    return query.where(col(Contact.erased_at).is_(None)).where(col(Contact.merged_into).is_(None))


async def by_external_id(session: AsyncSession, external_id: str) -> Contact | None:
    query = _live(select(Contact).where(Contact.external_id == external_id))
    contact: Contact | None = (await session.exec(query)).first()
    return contact


async def by_email(session: AsyncSession, email: str) -> Contact | None:
    query = _live(select(Contact).where(Contact.email == email))
    contact: Contact | None = (await session.exec(query)).first()
    return contact


async def by_anonymous_id(session: AsyncSession, anonymous_id: str) -> Contact | None:
    """The live contact an anonymous id belongs to, following tombstones to their target;
    an identified contact is preferred over a still-anonymous one."""
    rows = (
        await session.exec(
            select(Contact)
            .where(Contact.anonymous_id == anonymous_id)
            .where(col(Contact.erased_at).is_(None))
            .order_by(col(Contact.created_at))
        )
    ).all()
    found: list[Contact] = []
    for contact in rows:
        seen = {contact.id}
        current: Contact | None = contact
        while current is not None and current.merged_into is not None:
            current = await session.get(Contact, current.merged_into)
            if current is None or current.id in seen:
                current = None
            else:
                seen.add(current.id)
        if current is not None and current.erased_at is None:
            found.append(current)
    found.sort(key=lambda c: not is_identified(c))
    return found[0] if found else None


def is_identified(contact: Contact) -> bool:
    return contact.email is not None or contact.external_id is not None


async def resolve(
    session: AsyncSession,
    work: IdentityWork,
    *,
    user_id: str | None = None,
    email: str | None = None,
    anonymous_id: str | None = None,
) -> Resolution:
    """Find or create the contact for these identities, merging an anonymous visitor.

    ``user_id`` is the external id. When the user id and the email belong to two different
    contacts, the user id wins and the email is left where it is (``conflict`` says so):
    refusing the call would make a CDP drop the whole batch it came in.
    """
    identified = await by_external_id(session, user_id) if user_id is not None else None
    conflict = None
    if email is not None:
        owner = await by_email(session, email)
        if identified is None:
            identified = owner
        elif owner is not None and owner.id != identified.id:
            conflict = f"email {email} belongs to another contact; not moved to userId {user_id}"
            email = None
    anonymous = None
    if anonymous_id is not None:
        anonymous = await by_anonymous_id(session, anonymous_id)
        if anonymous is not None and is_identified(anonymous):
            if identified is None and user_id is None and email is None:
                # Only an anonymous id was given and it is already someone's: that is them.
                return Resolution(anonymous, conflict=conflict)
            anonymous = None
    if identified is None and anonymous is None and user_id is None and email is None:
        if anonymous_id is None:
            raise ValueError("a call needs a userId, an email or an anonymousId")
        contact = Contact(anonymous_id=anonymous_id)
        session.add(contact)
        await session.flush()
        work.contacts_created += 1
        return Resolution(contact, created=True, changed=True)
    created = changed = False
    if identified is None:
        if anonymous is not None:
            contact = anonymous  # the visitor becomes the identified contact
        else:
            contact = Contact(anonymous_id=anonymous_id)
            created = True
            work.contacts_created += 1
    else:
        contact = identified
        if anonymous is not None and anonymous.id != identified.id:
            await merge(session, work, anonymous, identified)
            changed = True
    if user_id is not None and contact.external_id != user_id:
        contact.external_id = user_id
        changed = True
    if email is not None and contact.email != email:
        contact.email = email
        changed = True
    if anonymous_id is not None and contact.anonymous_id is None:
        contact.anonymous_id = anonymous_id
    if changed or created:
        contact.updated_at = utcnow()
    session.add(contact)
    await session.flush()
    if changed or created:
        work.touched.add(contact.id)
    return Resolution(contact, created=created, changed=changed or created, conflict=conflict)


async def merge(
    session: AsyncSession, work: IdentityWork, source: Contact, target: Contact
) -> None:
    """Merge ``source`` into ``target`` (see the module docstring); ``source`` is a tombstone."""
    await session.exec(
        update(Event).where(col(Event.contact_id) == source.id).values(contact_id=target.id)
    )
    # Earlier tombstones of the source now point straight at the target.
    await session.exec(
        update(Contact).where(col(Contact.merged_into) == source.id).values(merged_into=target.id)
    )
    ended = (
        await session.exec(
            select(Enrollment)
            .where(Enrollment.contact_id == source.id)
            .where(Enrollment.status == EnrollmentStatus.active)
        )
    ).all()
    now = utcnow()
    for enrollment in ended:
        enrollment.status = EnrollmentStatus.exited
        enrollment.exit_reason = MERGED
        enrollment.ended_at = now
        session.add(enrollment)
        work.runs_to_end.append((enrollment.workflow_id, enrollment.run_id))
    # A tombstone is in no segment; the target's memberships are refreshed after commit.
    await session.exec(delete(SegmentMember).where(col(SegmentMember.contact_id) == source.id))
    email, phone = source.email, source.phone
    target.attributes = {**source.attributes, **target.attributes}
    target.tags = list(dict.fromkeys([*target.tags, *source.tags]))
    target.timezone = target.timezone or source.timezone
    target.anonymous_id = target.anonymous_id or source.anonymous_id
    source.merged_into = target.id
    source.email = source.external_id = None
    source.updated_at = target.updated_at = now
    session.add(source)
    # The tombstone lets go of its unique email before the target may take it.
    await session.flush()
    target.email = target.email or email
    target.phone = target.phone or phone
    session.add(target)
    await session.flush()
    work.merges += 1
    work.tombstones.add(source.id)
    work.touched.discard(source.id)
    work.touched.add(target.id)


def apply_attributes(contact: Contact, attributes: dict[str, Any]) -> bool:
    """Merge attributes into the contact (None deletes a key); return whether any changed."""
    if not contact.merge_attributes(attributes):
        return False
    contact.updated_at = utcnow()
    return True


async def end_merged_runs(temporal: Client, runs: Iterable[tuple[str, str | None]]) -> None:
    """Terminate the workflows of enrollments ended by a merge (already marked exited)."""
    for workflow_id, run_id in runs:
        try:
            await temporal.get_workflow_handle(workflow_id, run_id=run_id).terminate(
                "contact merged into another contact"
            )
        except RPCError as err:
            # The enrollment is already marked exited and sends re-check that, so an
            # unreachable Temporal must not fail a call whose changes are committed.
            if err.status != RPCStatusCode.NOT_FOUND:
                log.warning("could not terminate merged run %s: %s", workflow_id, err)
