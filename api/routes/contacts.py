from __future__ import annotations

import base64
import binascii
import uuid
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from sqlalchemy.exc import IntegrityError
from sqlmodel import col, select

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.erasure import erase_contact
from api.imports import import_contacts
from api.schemas import (
    ContactPage,
    ContactPublic,
    ContactRef,
    ContactUpdate,
    ContactUpsert,
    ContactUpsertResult,
    ErasureResult,
    ImportResult,
)
from api.services import dispatch_contact_changes, find_contact, notify_contact_changed
from models.tables import Contact, Segment, SegmentMember, utcnow

router = APIRouter(prefix="/contacts", tags=["contacts"])


@router.post("", response_model=ContactUpsertResult)
async def upsert_contact(
    body: ContactUpsert,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> ContactUpsertResult:
    """Identify a contact by external_id or email: create it, or merge into the stored one."""
    by_external = by_email = None
    if body.external_id is not None:
        by_external = (
            await session.exec(select(Contact).where(Contact.external_id == body.external_id))
        ).first()
    if body.email is not None:
        by_email = (await session.exec(select(Contact).where(Contact.email == body.email))).first()
    if by_external and by_email and by_external.id != by_email.id:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"external_id {body.external_id} and email {body.email} belong to different contacts",
        )
    contact = by_external or by_email
    created = contact is None
    if contact is None:
        contact = Contact()
    for name in ("email", "external_id", "phone", "timezone", "lifecycle_stage", "tags"):
        value = getattr(body, name)
        if value is not None:
            setattr(contact, name, value)
    contact.merge_attributes(body.attributes)
    contact.updated_at = utcnow()
    session.add(contact)
    await session.flush()
    await session.refresh(contact)
    # Commit before telling the journeys, so their goals see what is stored.
    await session.commit()
    await dispatch_contact_changes(
        session, temporal, settings, [contact.id], profile_changed=not created
    )
    await session.refresh(contact)
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return ContactUpsertResult(
        created=created, contact=ContactPublic.model_validate(contact, from_attributes=True)
    )


@router.get("/{contact_id}", response_model=ContactPublic)
async def get_contact(contact_id: uuid.UUID, session: SessionDep) -> ContactPublic:
    contact = await find_contact(session, ContactRef(contact_id=contact_id))
    return ContactPublic.model_validate(contact, from_attributes=True)


def _cursor(contact_id: uuid.UUID) -> str:
    return base64.urlsafe_b64encode(contact_id.bytes).decode().rstrip("=")


def _after(cursor: str) -> uuid.UUID:
    try:
        return uuid.UUID(bytes=base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
    except (binascii.Error, ValueError):
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST,
            f"invalid cursor {cursor!r}: pass the `next` of the previous page",
        ) from None


@router.get("", response_model=ContactPage)
async def list_contacts(
    session: SessionDep,
    segment: Annotated[str | None, Query(description="Only members of this segment (key).")] = None,
    email: str | None = None,
    tag: str | None = None,
    lifecycle_stage: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    after: Annotated[str | None, Query(description="The `next` cursor of the last page.")] = None,
) -> ContactPage:
    """Contacts in a stable order, a page at a time; erased and merged ones are never listed."""
    query = (
        select(Contact)
        .where(col(Contact.erased_at).is_(None))
        .where(col(Contact.merged_into).is_(None))
    )
    if segment is not None:
        segment_id = (await session.exec(select(Segment.id).where(Segment.key == segment))).first()
        if segment_id is None:
            raise HTTPException(status.HTTP_404_NOT_FOUND, f"no segment with key {segment!r}")
        query = query.where(
            col(Contact.id).in_(
                select(SegmentMember.contact_id).where(SegmentMember.segment_id == segment_id)
            )
        )
    if email is not None:
        query = query.where(Contact.email == email.strip().lower())
    if tag is not None:
        query = query.where(col(Contact.tags).contains([tag]))
    if lifecycle_stage is not None:
        query = query.where(Contact.lifecycle_stage == lifecycle_stage)
    if after is not None:
        query = query.where(col(Contact.id) > _after(after))
    rows = (await session.exec(query.order_by(col(Contact.id)).limit(limit + 1))).all()
    page = rows[:limit]
    return ContactPage(
        contacts=[ContactPublic.model_validate(c, from_attributes=True) for c in page],
        next=_cursor(page[-1].id) if len(rows) > limit else None,
    )


@router.patch("/{contact_id}", response_model=ContactPublic)
async def update_contact(
    contact_id: uuid.UUID,
    body: ContactUpdate,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
) -> ContactPublic:
    """Change only the fields given; ``null`` clears email, external_id, phone or timezone."""
    contact = await find_contact(session, ContactRef(contact_id=contact_id))
    given = body.model_fields_set
    for name in ("email", "external_id"):
        value = getattr(body, name)
        if name in given and value is not None:
            owner = (
                await session.exec(
                    select(Contact.id)
                    .where(getattr(Contact, name) == value)
                    .where(Contact.id != contact.id)
                )
            ).first()
            if owner is not None:
                raise HTTPException(
                    status.HTTP_409_CONFLICT, f"{name} {value} belongs to contact {owner}"
                )
    for name in ("email", "external_id", "phone", "timezone", "lifecycle_stage", "tags"):
        if name in given:
            setattr(contact, name, getattr(body, name))
    if contact.email is None and contact.external_id is None:
        raise HTTPException(
            status.HTTP_422_UNPROCESSABLE_CONTENT, "a contact needs an email or an external_id"
        )
    if body.attributes:
        contact.merge_attributes(body.attributes)
    contact.updated_at = utcnow()
    session.add(contact)
    try:
        await session.commit()
    except IntegrityError:
        # Another request took the email or external_id since the check above.
        raise HTTPException(
            status.HTTP_409_CONFLICT, "email or external_id was just taken by another contact"
        ) from None
    await dispatch_contact_changes(session, temporal, settings, [contact.id], profile_changed=True)
    await session.refresh(contact)
    return ContactPublic.model_validate(contact, from_attributes=True)


@router.post(
    "/import",
    response_model=ImportResult,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/json": {"schema": {"type": "array", "items": {"type": "object"}}},
                "application/x-ndjson": {"schema": {"type": "string"}},
            },
        }
    },
)
async def import_contacts_route(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ImportResult:
    """Create or update many contacts in one request: CSV (header row; tags separated by
    ';'; other columns are attributes; an empty cell is not given), a JSON array of contact
    bodies, or NDJSON (one per line). Valid rows are stored, invalid ones reported.
    """
    outcome = await import_contacts(session, request, settings)
    await session.commit()
    await dispatch_contact_changes(session, temporal, settings, None, profile_changed=False)
    for contact_id in outcome.enrolled:
        contact = await session.get(Contact, contact_id)
        if contact is not None:
            await notify_contact_changed(session, temporal, contact)
    return outcome.result


@router.delete("/{contact_id}", response_model=ErasureResult)
async def erase_contact_route(
    contact_id: uuid.UUID, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ErasureResult:
    """Erase a contact (GDPR): personal data leaves every table, the outbox and Temporal.

    The contact stays as an anonymous tombstone; its journeys end. Erasing again redoes
    the steps and reports what it changed (zeros once all is gone); an unknown id is 404.
    """
    contact = await session.get(Contact, contact_id)
    if contact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no contact with id {contact_id}")
    return await erase_contact(session, temporal, settings, contact)


@router.post("/{contact_id}/erase", response_model=ErasureResult)
async def erase_contact_by_post(
    contact_id: uuid.UUID, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> ErasureResult:
    """The same as ``DELETE /v1/contacts/{contact_id}``, for clients that cannot send DELETE."""
    return await erase_contact_route(contact_id, session, temporal, settings)
