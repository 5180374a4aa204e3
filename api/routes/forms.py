"""Website form fills: ``POST /webhooks/forms/{form}``.

Not behind the API key: websites post here directly, and a key in a web page is no
secret. Each fill upserts the contact by its email and records a ``form_submitted`` event
(stored once per idempotency key), then goes to the journeys like any other event.
No redirect is offered: a ``_redirect`` field would make this an open redirect.
"""

from __future__ import annotations

import json
import re
import uuid
from email.parser import BytesParser
from email.policy import HTTP
from email.utils import collapse_rfc2231_value
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import select

from activities.counters import EVENTS_RECEIVED
from activities.delivery import dispatch_contact_changes, dispatch_event, or_defer
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.identity import IdentityWork, apply_attributes, end_merged_runs, lock_identities, resolve
from api.schemas import normalise_email, normalise_phone
from models.tables import Event, utcnow

router = APIRouter(prefix="/webhooks/forms", tags=["webhooks"])

FORM_KEY = re.compile(r"^[a-z0-9][a-z0-9-]{0,63}$")
MAX_BODY_BYTES = 64 * 1024
HONEYPOT = "_hp"
EVENT_NAME = "form_submitted"
SOURCE = "form"
# The contact's own fields: stored on the contact, not copied into the event.
CONTACT_FIELDS = ("email", "phone")


class FormAccepted(BaseModel):
    contact_id: uuid.UUID | None
    event_id: uuid.UUID | None
    duplicate: bool


async def _read_capped(request: Request) -> bytes:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(
                status.HTTP_413_CONTENT_TOO_LARGE,
                f"a form fill may have at most {MAX_BODY_BYTES // 1024} KB",
            )
    return bytes(body)


def _multipart(content_type: str, body: bytes) -> list[tuple[str, Any]]:
    """Text fields of a multipart/form-data body; uploaded files are not stored.

    Parsed with the standard library's MIME parser (python-multipart is no dependency).
    """
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body is not multipart/form-data")
    fields: list[tuple[str, Any]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name or part.get_filename():
            continue
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        charset = part.get_content_charset() or "utf-8"
        fields.append((collapse_rfc2231_value(name), payload.decode(charset, "replace")))
    return fields


def parse_fields(content_type: str, body: bytes) -> dict[str, Any]:
    """The submitted fields; a name given more than once keeps all its values in a list."""
    media = content_type.split(";")[0].strip().lower()
    pairs: list[tuple[str, Any]]
    if media == "application/x-www-form-urlencoded":
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    elif media == "multipart/form-data":
        pairs = _multipart(content_type, body)
    elif media == "application/json" or media.endswith("+json"):
        try:
            payload = json.loads(body)
        except ValueError as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body is not JSON: {err}") from None
        if not isinstance(payload, dict):
            raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "body: must be an object")
        return payload
    else:
        raise HTTPException(
            status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
            "send application/x-www-form-urlencoded, multipart/form-data or application/json",
        )
    fields: dict[str, Any] = {}
    for name, value in pairs:
        if name in fields:
            previous = fields[name]
            fields[name] = [*previous, value] if isinstance(previous, list) else [previous, value]
        else:
            fields[name] = value
    return fields


def _text(fields: dict[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"{name}: must be one string")
    return value.strip()


@router.post(
    "/{form}",
    response_model=FormAccepted,
    status_code=status.HTTP_202_ACCEPTED,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                media: {"schema": {"type": "object", "required": ["email"]}}
                for media in (
                    "application/x-www-form-urlencoded",
                    "multipart/form-data",
                    "application/json",
                )
            },
        }
    },
)
async def submit_form(
    form: str,
    request: Request,
    response: Response,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
) -> FormAccepted:
    """Record a website form fill: upsert the contact by ``email`` (``phone`` optional, other
    fields become attributes), and store a ``form_submitted`` event.

    Fields starting with ``_`` are not stored; a non-empty ``_hp`` (a honeypot field hidden
    from people) drops the fill silently; ``_anonymous_id`` (the site's analytics id) merges
    the visitor's earlier anonymous activity into the contact. The idempotency key is the
    ``Idempotency-Key`` header, else the ``_submission_id`` field.
    """
    if not FORM_KEY.match(form):
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no form {form!r}: keys are [a-z0-9-]")
    body = await _read_capped(request)
    fields = parse_fields(request.headers.get("content-type", ""), body)
    if fields.get(HONEYPOT) not in (None, "", []):
        # A bot filled the hidden field: answer as if nothing were wrong, store nothing.
        response.status_code = status.HTTP_200_OK
        return FormAccepted(contact_id=None, event_id=None, duplicate=False)
    raw_email = _text(fields, "email")
    if raw_email is None:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, "email: field required")
    try:
        email = normalise_email(raw_email)
    except ValueError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"email: {err}") from None
    raw_phone = _text(fields, "phone")
    try:
        phone = normalise_phone(raw_phone) if raw_phone else None
    except ValueError as err:
        raise HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, f"phone: {err}") from None
    anonymous_id = _text(fields, "_anonymous_id")
    submission = idempotency_key or _text(fields, "_submission_id") or str(uuid.uuid4())
    # Form keys and submission ids are short and site-chosen: scoped so they never collide
    # with another source's ids.
    idempotency_id = f"form:{form}:{submission}"[:200]
    visible = {name: value for name, value in fields.items() if not name.startswith("_")}
    attributes = {
        name: value
        for name, value in visible.items()
        if name not in CONTACT_FIELDS and value not in ("", [])
    }
    properties = {
        **{name: value for name, value in visible.items() if name not in CONTACT_FIELDS},
        "form": form,
    }

    keys = [f"email:{email}"] + ([f"anonymous:{anonymous_id}"] if anonymous_id else [])
    await lock_identities(session, keys)
    existing = (
        await session.exec(select(Event).where(Event.idempotency_id == idempotency_id))
    ).first()
    if existing is not None:
        await session.commit()
        accepted = FormAccepted(
            contact_id=existing.contact_id, event_id=existing.id, duplicate=True
        )
        if existing.delivered_at is None:
            await or_defer(
                session,
                temporal,
                lambda: dispatch_event(session, temporal, settings, existing),
                f"form fill {idempotency_id}",
            )
        response.status_code = status.HTTP_200_OK
        return accepted

    work = IdentityWork()
    found = await resolve(session, work, email=email, anonymous_id=anonymous_id)
    contact = found.contact
    changed = apply_attributes(contact, attributes)
    if phone is not None and contact.phone != phone:
        contact.phone, changed = phone, True
    session.add(contact)
    await session.flush()
    now = utcnow()
    event_id = uuid.uuid4()
    await session.exec(
        insert(Event)
        .values(
            id=event_id,
            idempotency_id=idempotency_id,
            contact_id=contact.id,
            name=EVENT_NAME,
            properties=properties,
            occurred_at=now,
            received_at=now,
            source=SOURCE,
        )
        .on_conflict_do_nothing(index_elements=["idempotency_id"])
    )
    # Commit before dispatching: nothing acts on an uncommitted row.
    await session.commit()
    event = (await session.exec(select(Event).where(Event.idempotency_id == idempotency_id))).one()
    if event.id == event_id:
        EVENTS_RECEIVED.labels(SOURCE).inc()
    accepted = FormAccepted(
        contact_id=contact.id, event_id=event.id, duplicate=event.id != event_id
    )

    async def dispatch() -> None:
        await end_merged_runs(temporal, work.runs_to_end)
        if changed or found.changed:
            await dispatch_contact_changes(
                session, temporal, settings, [contact.id], profile_changed=not found.created
            )
        await dispatch_event(session, temporal, settings, event)

    # Stored and committed, so acknowledged even when Temporal is unreachable: the inbox
    # drain delivers the event later.
    await or_defer(session, temporal, dispatch, f"form fill {idempotency_id}")
    return accepted
