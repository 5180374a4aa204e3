"""Segment-spec endpoints, so a CDP (Segment, RudderStack, analytics.js through a proxy)
sends to Nurture unchanged: ``POST /v1/batch`` (Segment's HTTP Tracking API) and the
single calls ``/v1/identify``, ``/track``, ``/page``, ``/screen``, ``/alias``, ``/group``.

A request is validated whole before anything is stored: one malformed call refuses the
whole request with a 400 that names the call's index and field. A valid request is stored
in one transaction, committed, then dispatched to the journeys.

Mapping: identify upserts the contact (userId is the external id; traits.email and
traits.phone are normalised; other traits become attributes under their own names) and
merges the anonymous visitor (see ``api.identity``); track stores an event named
``event``; page and screen store ``page_viewed`` / ``screen_viewed``; group stores
``group_joined``; alias merges previousId's contact into userId's. The idempotency id is
``messageId``: the same message twice is stored and dispatched once.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client

from activities.counters import EVENTS_RECEIVED
from activities.delivery import dispatch_contact_changes, dispatch_event, or_defer
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.identity import (
    IdentityWork,
    apply_attributes,
    by_anonymous_id,
    by_external_id,
    end_merged_runs,
    lock_identities,
    merge,
    resolve,
)
from api.schemas import normalise_email, normalise_phone
from models.journey import KNOWN_TIMEZONES
from models.tables import Event, utcnow
from settings import Settings

router = APIRouter(tags=["segment"])

# Segment's own limits, so a CDP that works against Segment works against us.
MAX_BATCH_BYTES = 500 * 1024
MAX_CALL_BYTES = 32 * 1024
SOURCE = "segment"
# Page properties Segment's libraries put in context.page rather than in properties.
PAGE_CONTEXT_KEYS = ("path", "url", "title", "referrer", "search")


def _segment_id(value: Any) -> Any:
    """Segment ids are strings; some libraries send numbers. An empty id counts as absent."""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    if value == "":
        return None
    return value


def _iso_time(value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str):
        raise ValueError("must be an ISO 8601 date-time string, e.g. 2026-11-22T09:00:00.000Z")
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(f"{value!r} is not an ISO 8601 date-time") from None
    # Segment's libraries always send an offset; a bare time is taken as UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


SegmentId = Annotated[str, Field(min_length=1, max_length=200), BeforeValidator(_segment_id)]
IsoTime = Annotated[datetime | None, BeforeValidator(_iso_time)]


class SegmentCall(BaseModel):
    """The fields every Segment call shares. Unknown fields are tolerated (Segment adds
    fields over time); the known ones are type-checked."""

    model_config = ConfigDict(extra="allow")

    type: str
    userId: SegmentId | None = None
    anonymousId: SegmentId | None = None
    messageId: SegmentId | None = None
    timestamp: IsoTime = None
    originalTimestamp: IsoTime = None
    sentAt: IsoTime = None
    receivedAt: IsoTime = None
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _someone(self) -> SegmentCall:
        if self.userId is None and self.anonymousId is None:
            raise ValueError("userId or anonymousId is required")
        return self


class IdentifyCall(SegmentCall):
    type: Literal["identify"]
    traits: dict[str, Any] = Field(default_factory=dict)


class TrackCall(SegmentCall):
    type: Literal["track"]
    event: str = Field(min_length=1, max_length=200)
    properties: dict[str, Any] = Field(default_factory=dict)


class PageCall(SegmentCall):
    type: Literal["page"]
    name: str | None = None
    category: str | None = None
    properties: dict[str, Any] = Field(default_factory=dict)


class ScreenCall(PageCall):
    type: Literal["screen"]  # type: ignore[assignment]


class GroupCall(SegmentCall):
    type: Literal["group"]
    groupId: SegmentId
    traits: dict[str, Any] = Field(default_factory=dict)


class AliasCall(SegmentCall):
    type: Literal["alias"]
    previousId: SegmentId

    @model_validator(mode="after")
    def _user(self) -> AliasCall:
        if self.userId is None:
            raise ValueError("userId is required: alias merges previousId into userId")
        return self


CALL_TYPES: dict[str, type[SegmentCall]] = {
    "identify": IdentifyCall,
    "track": TrackCall,
    "page": PageCall,
    "screen": ScreenCall,
    "group": GroupCall,
    "alias": AliasCall,
}


class SegmentBatch(BaseModel):
    """Segment's batch body; ``context`` and ``integrations`` apply to every call in it."""

    model_config = ConfigDict(extra="allow")

    batch: list[Any]
    context: dict[str, Any] = Field(default_factory=dict)
    integrations: dict[str, Any] = Field(default_factory=dict)
    sentAt: IsoTime = None


class SegmentAccepted(BaseModel):
    success: bool = True
    received: int
    stored: int = Field(description="New events stored.")
    duplicates: int = Field(description="Events whose messageId was already stored.")
    contacts_created: int
    merged: int = Field(description="Contacts merged into another (anonymous visitors, aliases).")
    conflicts: list[str] = Field(
        default_factory=list,
        description="Identities not applied because they belong to another contact.",
    )


class _Invalid(Exception):
    """A malformed call; ``field`` is empty when the call as a whole is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message

    def at(self, where: str) -> str:
        return f"{where}.{self.field}: {self.message}" if self.field else f"{where}: {self.message}"


def _first_error(err: ValidationError) -> _Invalid:
    first = err.errors()[0]
    field = ".".join(str(part) for part in first["loc"])
    return _Invalid(field, first["msg"].removeprefix("Value error, "))


class _Checked:
    """A validated call, with the contact fields taken from its traits."""

    def __init__(self, call: SegmentCall) -> None:
        self.call = call
        self.email: str | None = None
        self.phone: str | None = None
        self.attributes: dict[str, Any] = {}


def check_call(item: Any, defaults: dict[str, Any], forced_type: str | None = None) -> _Checked:
    """Validate one call, or raise ``_Invalid`` naming the field."""
    if not isinstance(item, dict):
        raise _Invalid("", "a call must be a JSON object")
    size = len(json.dumps(item, separators=(",", ":"), default=str).encode())
    if size > MAX_CALL_BYTES:
        raise _Invalid("", f"{size} bytes; a call may have at most {MAX_CALL_BYTES} (32 KB)")
    item = {**item}
    if forced_type is not None:
        item["type"] = forced_type
    kind = item.get("type")
    if kind is None:
        raise _Invalid("type", "Field required")
    model = CALL_TYPES.get(kind) if isinstance(kind, str) else None
    if model is None:
        raise _Invalid("type", f"unknown call type {kind!r}; use one of {', '.join(CALL_TYPES)}")
    for name in ("context", "integrations"):
        if name in defaults and isinstance(item.get(name, {}), dict):
            item[name] = {**defaults[name], **item.get(name, {})}
    try:
        call = model.model_validate(item)
    except ValidationError as err:
        raise _first_error(err) from None
    checked = _Checked(call)
    if isinstance(call, IdentifyCall):
        traits = dict(call.traits)
        email, phone = traits.pop("email", None), traits.pop("phone", None)
        try:
            checked.email = normalise_email(email) if email is not None else None
        except (ValueError, TypeError, AttributeError) as err:
            raise _Invalid("traits.email", str(err)) from None
        try:
            checked.phone = normalise_phone(phone) if phone is not None else None
        except (ValueError, TypeError) as err:
            raise _Invalid("traits.phone", str(err)) from None
        checked.attributes = traits
    return checked


def check_all(items: list[Any], defaults: dict[str, Any], label: str) -> list[_Checked]:
    """Validate every call before anything is stored; the first bad one refuses them all."""
    checked = []
    for index, item in enumerate(items):
        try:
            checked.append(check_call(item, defaults))
        except _Invalid as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, err.at(f"{label}[{index}]")) from None
    return checked


def event_of(call: SegmentCall) -> tuple[str, dict[str, Any]] | None:
    """The event a call records (name, properties), or None for identify and alias."""
    if isinstance(call, TrackCall):
        return call.event, call.properties
    if isinstance(call, PageCall):
        properties: dict[str, Any] = {}
        page = call.context.get("page")
        if isinstance(call, ScreenCall):
            name = "screen_viewed"
        else:
            name = "page_viewed"
            if isinstance(page, dict):
                properties.update({k: page[k] for k in PAGE_CONTEXT_KEYS if k in page})
        properties.update(name=call.name, category=call.category, **call.properties)
        # Journeys match pages by the `page` property (as POST /v1/events sends it).
        if name == "page_viewed" and "page" not in properties and "path" in properties:
            properties["page"] = properties["path"]
        return name, properties
    if isinstance(call, GroupCall):
        return "group_joined", {"group_id": call.groupId, "traits": call.traits}
    return None


def identity_keys(checked: list[_Checked]) -> list[str]:
    keys = []
    for item in checked:
        call = item.call
        if call.userId is not None:
            keys.append(f"user:{call.userId}")
        if call.anonymousId is not None:
            keys.append(f"anonymous:{call.anonymousId}")
        if item.email is not None:
            keys.append(f"email:{item.email}")
        if isinstance(call, AliasCall):
            keys += [f"user:{call.previousId}", f"anonymous:{call.previousId}"]
    return keys


async def _alias(session: AsyncSession, work: IdentityWork, call: AliasCall) -> None:
    """Merge previousId's contact (an external id, else an anonymous id) into userId's."""
    assert call.userId is not None
    previous = await by_external_id(session, call.previousId) or await by_anonymous_id(
        session, call.previousId
    )
    target = await by_external_id(session, call.userId)
    if previous is None:
        await resolve(session, work, user_id=call.userId)
    elif target is None:
        # No contact has the new id yet: the previous one takes it.
        previous.external_id = call.userId
        previous.updated_at = utcnow()
        session.add(previous)
        await session.flush()
        work.touched.add(previous.id)
    elif previous.id != target.id:
        await merge(session, work, previous, target)


class _Stored:
    def __init__(self) -> None:
        self.new: list[uuid.UUID] = []
        self.duplicates: list[str] = []
        self.conflicts: list[str] = []


async def store_calls(
    session: AsyncSession, checked: list[_Checked], work: IdentityWork, label: str
) -> _Stored:
    """Apply every call in order, in the caller's transaction."""
    await lock_identities(session, identity_keys(checked))
    stored = _Stored()
    now = utcnow()
    for index, item in enumerate(checked):
        call = item.call
        if isinstance(call, AliasCall):
            await _alias(session, work, call)
            continue
        found = await resolve(
            session, work, user_id=call.userId, email=item.email, anonymous_id=call.anonymousId
        )
        if found.conflict:
            stored.conflicts.append(f"{label}[{index}]: {found.conflict}")
        contact = found.contact
        if isinstance(call, IdentifyCall):
            changed = apply_attributes(contact, item.attributes)
            if item.phone is not None and contact.phone != item.phone:
                contact.phone, changed = item.phone, True
            zone = call.context.get("timezone")
            if contact.timezone is None and isinstance(zone, str) and zone in KNOWN_TIMEZONES:
                contact.timezone, changed = zone, True
            if changed:
                contact.updated_at = utcnow()
                session.add(contact)
                await session.flush()
                work.touched.add(contact.id)
        recorded = event_of(call)
        if recorded is None:
            continue
        name, properties = recorded
        idempotency_id = call.messageId or str(uuid.uuid4())
        inserted = await session.exec(
            insert(Event)
            .values(
                id=uuid.uuid4(),
                idempotency_id=idempotency_id,
                contact_id=contact.id,
                name=name,
                properties=properties,
                occurred_at=call.timestamp or call.originalTimestamp or now,
                received_at=now,
                source=SOURCE,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_id"])
            .returning(col(Event.id))
        )
        row = inserted.first()
        if row is None:
            stored.duplicates.append(idempotency_id)
        else:
            stored.new.append(row[0])
            EVENTS_RECEIVED.labels(SOURCE).inc()
    return stored


async def accept(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    checked: list[_Checked],
    label: str,
) -> SegmentAccepted:
    """Store the validated calls in one transaction, commit, then dispatch (or, with Temporal
    unreachable, leave the events to the inbox drain: they are stored, so acknowledged)."""
    work = IdentityWork()
    stored = await store_calls(session, checked, work, label)
    # Commit before dispatching: nothing acts on an uncommitted row.
    await session.commit()

    async def dispatch() -> None:
        await end_merged_runs(temporal, work.runs_to_end)
        changed = work.touched - work.tombstones
        if changed:
            await dispatch_contact_changes(
                session, temporal, settings, sorted(changed), profile_changed=True
            )
        events: dict[uuid.UUID, Event] = {}
        if stored.new:
            found = (await session.exec(select(Event).where(col(Event.id).in_(stored.new)))).all()
            by_id = {event.id: event for event in found}
            events = {event_id: by_id[event_id] for event_id in stored.new}
        if stored.duplicates:
            # A duplicate stored earlier but never delivered (a crash after its commit) goes
            # now.
            undelivered = await session.exec(
                select(Event)
                .where(col(Event.idempotency_id).in_(stored.duplicates))
                .where(col(Event.delivered_at).is_(None))
            )
            for event in undelivered.all():
                events.setdefault(event.id, event)
        for event in events.values():
            await dispatch_event(session, temporal, settings, event)

    await or_defer(session, temporal, dispatch, f"{label} of {len(checked)} call(s)")
    return SegmentAccepted(
        received=len(checked),
        stored=len(stored.new),
        duplicates=len(stored.duplicates),
        contacts_created=work.contacts_created,
        merged=work.merges,
        conflicts=stored.conflicts,
    )


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, read no further than ``limit`` bytes. The content type is
    not checked: analytics.js posts JSON as text/plain to avoid a CORS preflight."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise HTTPException(
                status.HTTP_400_BAD_REQUEST, f"body is over {limit // 1024} KB, Segment's limit"
            )
    try:
        return json.loads(body)
    except ValueError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, f"body is not JSON: {err}") from None


def _documented(model: type[BaseModel]) -> dict[str, Any]:
    """The body schema for /docs: bodies are read by hand so every error is a 400."""
    schema = {"schema": model.model_json_schema()}
    return {"requestBody": {"required": True, "content": {"application/json": schema}}}


@router.post("/batch", response_model=SegmentAccepted, openapi_extra=_documented(SegmentBatch))
async def segment_batch(
    request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> SegmentAccepted:
    """Segment's HTTP Tracking API batch: every call is validated, then all are stored."""
    payload = await read_json(request, MAX_BATCH_BYTES)
    if not isinstance(payload, dict):
        raise HTTPException(status.HTTP_400_BAD_REQUEST, "body must be an object with a batch")
    try:
        envelope = SegmentBatch.model_validate(payload)
    except ValidationError as err:
        raise HTTPException(status.HTTP_400_BAD_REQUEST, _first_error(err).at("body")) from None
    defaults = {"context": envelope.context, "integrations": envelope.integrations}
    checked = check_all(envelope.batch, defaults, "batch")
    return await accept(session, temporal, settings, checked, "batch")


def _single_call(kind: str) -> None:
    async def endpoint(
        request: Request, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
    ) -> SegmentAccepted:
        payload = await read_json(request, MAX_CALL_BYTES)
        try:
            checked = [check_call(payload, {}, forced_type=kind)]
        except _Invalid as err:
            raise HTTPException(status.HTTP_400_BAD_REQUEST, err.at(kind)) from None
        return await accept(session, temporal, settings, checked, kind)

    router.post(
        f"/{kind}",
        response_model=SegmentAccepted,
        name=f"segment_{kind}",
        summary=f"Segment {kind} call",
        openapi_extra=_documented(CALL_TYPES[kind]),
    )(endpoint)


for _kind in CALL_TYPES:
    _single_call(_kind)
