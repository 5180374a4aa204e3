from __future__ import annotations

import uuid

from fastapi import APIRouter, HTTPException, Response, status
from sqlmodel import select

from api.deps import SessionDep, SettingsDep, TemporalDep
from api.schemas import ContactPublic, ContactRef, ContactUpsert, ContactUpsertResult
from api.services import dispatch_contact_changes, find_contact
from models.tables import Contact, utcnow

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
    merged = dict(contact.attributes)
    for name, value in body.attributes.items():
        if value is None:
            merged.pop(name, None)
        else:
            merged[name] = value
    contact.attributes = merged
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
