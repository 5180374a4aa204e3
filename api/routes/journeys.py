from __future__ import annotations

import json
from typing import Annotated, Any

import yaml
from fastapi import APIRouter, HTTPException, Path, Request, Response, status
from fastapi.responses import JSONResponse
from sqlmodel import col, func, select

from activities.enrollments import EnrollmentRefused, enroll
from api.bulk import start_bulk_job
from api.deps import SessionDep, SettingsDep, TemporalDep
from api.guard import load_yaml
from api.routes.enrollments import enrollment_public
from api.schemas import (
    EnrollIn,
    EnrollResult,
    JourneyPublic,
    JourneyStatusResult,
    JourneyVersionPublic,
)
from api.services import find_contact, get_journey, notify_journey_status
from models.journey import (
    KEY_PATTERN,
    EmailStep,
    EnrollStep,
    JourneyDocument,
    JourneyValidationError,
    SmsStep,
    parse_journey,
)
from models.tables import Journey, JourneyStatus, JourneyVersion, Segment, Template, utcnow
from settings import Settings

router = APIRouter(prefix="/journeys", tags=["journeys"])

JourneyKey = Annotated[str, Path(pattern=KEY_PATTERN, description="Journey key, [a-z0-9-].")]

_DOCUMENT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "A journey document, as JSON or YAML (Content-Type: application/yaml).",
        "content": {
            "application/json": {"schema": JourneyDocument.model_json_schema(by_alias=True)},
            "application/yaml": {"schema": {"type": "string"}},
        },
    }
}


def invalid(problems: list[dict[str, Any]]) -> HTTPException:
    return HTTPException(
        status.HTTP_422_UNPROCESSABLE_CONTENT,
        {"message": "the journey document is invalid", "errors": problems},
    )


async def read_document(request: Request) -> tuple[dict[str, Any], JourneyDocument]:
    """Decode a JSON or YAML body and validate it as a journey document."""
    settings: Settings = request.app.state.settings
    raw_body = await request.body()
    content_type = request.headers.get("content-type", "application/json").split(";")[0].strip()
    try:
        if content_type in ("application/yaml", "application/x-yaml", "text/yaml"):
            raw = load_yaml(raw_body.decode("utf-8"), settings.max_json_depth)
        elif content_type == "application/json":
            raw = json.loads(raw_body)
        else:
            raise HTTPException(
                status.HTTP_415_UNSUPPORTED_MEDIA_TYPE,
                f"send the journey as application/json or application/yaml, not {content_type}",
            )
    except (ValueError, yaml.YAMLError) as err:
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, f"the body is not valid {content_type}: {err}"
        ) from None
    try:
        json.dumps(raw, allow_nan=False)
    except ValueError:
        # PostgreSQL's JSONB refuses them, and they compare with nothing anyway.
        raise HTTPException(
            status.HTTP_400_BAD_REQUEST, "NaN and Infinity are not JSON numbers; use finite numbers"
        ) from None
    try:
        document = parse_journey(raw)
    except JourneyValidationError as err:
        raise invalid(err.problems) from None
    return document.model_dump(by_alias=True, exclude_none=True, mode="json"), document


def public(journey: Journey) -> JourneyPublic:
    return JourneyPublic.model_validate(journey, from_attributes=True)


@router.post(
    "",
    response_model=JourneyPublic,
    status_code=status.HTTP_201_CREATED,
    openapi_extra=_DOCUMENT_BODY,
)
async def create_journey(request: Request, session: SessionDep) -> JourneyPublic:
    """Save a new journey as a draft (validated: errors name the step and field)."""
    raw, document = await read_document(request)
    if (await session.exec(select(Journey).where(Journey.key == document.key))).first():
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"journey {document.key!r} exists: PUT /v1/journeys/{document.key} to change its draft",
        )
    journey = Journey(key=document.key, name=document.name, draft=raw)
    session.add(journey)
    await session.flush()
    return public(journey)


@router.put("/{key}", response_model=JourneyPublic, openapi_extra=_DOCUMENT_BODY)
async def update_draft(key: JourneyKey, request: Request, session: SessionDep) -> JourneyPublic:
    """Replace a journey's draft; published versions never change."""
    raw, document = await read_document(request)
    if document.key != key:
        raise invalid(
            [
                {
                    "step": None,
                    "field": "key",
                    "message": f"key: {document.key!r} does not match the URL's {key!r}",
                }
            ]
        )
    journey = await get_journey(session, key)
    journey.draft, journey.name, journey.updated_at = raw, document.name, utcnow()
    session.add(journey)
    await session.flush()
    return public(journey)


@router.post("/validate", openapi_extra=_DOCUMENT_BODY)
async def validate_journey(request: Request, session: SessionDep) -> JSONResponse:
    """Check a document without saving it (templates it names must exist)."""
    _, document = await read_document(request)
    await _check_templates(session, document)
    return JSONResponse({"valid": True, "key": document.key})


@router.get("", response_model=list[JourneyPublic])
async def list_journeys(session: SessionDep) -> list[JourneyPublic]:
    rows = (await session.exec(select(Journey).order_by(col(Journey.key)))).all()
    return [public(j) for j in rows]


@router.get("/{key}", response_model=JourneyPublic)
async def get_journey_route(key: JourneyKey, session: SessionDep) -> JourneyPublic:
    return public(await get_journey(session, key))


@router.post(
    "/{key}/publish", response_model=JourneyVersionPublic, status_code=status.HTTP_201_CREATED
)
async def publish_journey(
    key: JourneyKey, session: SessionDep, temporal: TemporalDep, settings: SettingsDep
) -> JourneyVersionPublic:
    """Publish the draft as a new immutable version and make the journey active; with
    ``enroll_on_publish`` also start a bulk enrollment of the trigger segment's members."""
    journey = await get_journey(session, key)
    await session.refresh(journey, with_for_update=True)
    if journey.status == JourneyStatus.stopped:
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"journey {key!r} is stopped; a stopped journey stays stopped"
        )
    document = parse_journey(journey.draft)
    await _check_templates(session, document)
    latest = (
        await session.exec(
            select(func.max(JourneyVersion.version)).where(JourneyVersion.journey_id == journey.id)
        )
    ).one()
    version = JourneyVersion(
        journey_id=journey.id, version=(latest or 0) + 1, document=journey.draft
    )
    journey.current_version = version.version
    journey.trigger_event = document.trigger.event_name if document.trigger else None
    if journey.status == JourneyStatus.draft:
        journey.status = JourneyStatus.active
    journey.updated_at = utcnow()
    session.add(version)
    session.add(journey)
    await session.flush()
    published = JourneyVersionPublic(
        key=journey.key,
        version=version.version,
        document=version.document,
        published_at=version.published_at,
    )
    if document.enroll_on_publish and document.trigger and document.trigger.segment:
        # Committed with the version first: the job's contacts start on this version.
        job = await start_bulk_job(
            session, temporal, settings, journey, segment_key=document.trigger.segment
        )
        published.bulk_enrollment_id = job.id
    return published


@router.get("/{key}/versions/{version}", response_model=JourneyVersionPublic)
async def get_version(key: JourneyKey, version: int, session: SessionDep) -> JourneyVersionPublic:
    journey = await get_journey(session, key)
    row = (
        await session.exec(
            select(JourneyVersion)
            .where(JourneyVersion.journey_id == journey.id)
            .where(JourneyVersion.version == version)
        )
    ).first()
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"journey {key!r} has no version {version}")
    return JourneyVersionPublic(
        key=key, version=row.version, document=row.document, published_at=row.published_at
    )


@router.post("/{key}/enrollments", response_model=EnrollResult)
async def enroll_contact(
    key: JourneyKey,
    body: EnrollIn,
    session: SessionDep,
    temporal: TemporalDep,
    settings: SettingsDep,
    response: Response,
) -> EnrollResult:
    """Enroll one contact; enrolling again returns the same enrollment (200, created false)."""
    journey = await get_journey(session, key)
    contact = await find_contact(session, body)
    try:
        enrollment, created = await enroll(
            session, temporal, settings, journey, contact, trigger=body.trigger
        )
    except EnrollmentRefused as refused:
        raise HTTPException(status.HTTP_409_CONFLICT, str(refused)) from None
    response.status_code = status.HTTP_201_CREATED if created else status.HTTP_200_OK
    return EnrollResult(
        created=created, enrollment=await enrollment_public(session, settings, enrollment)
    )


async def _check_templates(session: SessionDep, document: JourneyDocument) -> None:
    """Templates and journeys the document names must exist (templates on the right channel)."""
    wanted = document.templates()
    names = wanted["email"] | wanted["sms"]
    rows = (
        await session.exec(
            select(Template.key, Template.channel).where(col(Template.key).in_(names))
        )
    ).all()
    channels = {key: channel for key, channel in rows}
    journeys = set(
        (
            await session.exec(select(Journey.key).where(col(Journey.key).in_(document.journeys())))
        ).all()
    )
    problems: list[dict[str, Any]] = []
    for step in document.steps:
        if isinstance(step, EmailStep | SmsStep):
            for channel, template in step.channel_templates().items():
                # channel: best names the other channel's template in <channel>_template.
                field = "template" if channel == step.type else f"{channel}_template"
                if template not in channels:
                    message = f"no template with key {template!r}"
                elif channels[template] != channel:
                    message = f"template {template!r} is for {channels[template]}, not {channel}"
                else:
                    continue
                problems.append(
                    {
                        "step": step.id,
                        "field": field,
                        "message": f"step {step.id!r} {field}: {message}",
                    }
                )
        elif isinstance(step, EnrollStep) and step.journey not in journeys:
            problems.append(
                {
                    "step": step.id,
                    "field": "journey",
                    "message": f"step {step.id!r} journey: no journey with key {step.journey!r}",
                }
            )
    named = document.segments()
    known = set((await session.exec(select(Segment.key).where(col(Segment.key).in_(named)))).all())
    problems.extend(
        {"step": None, "field": "segment", "message": f"no segment with key {key!r}"}
        for key in sorted(named - known)
    )
    if problems:
        raise invalid(problems)


async def _set_status(
    key: str, new_status: JourneyStatus, session: SessionDep, temporal: TemporalDep
) -> JourneyStatusResult:
    journey = await get_journey(session, key)
    await session.refresh(journey, with_for_update=True)
    allowed = {
        JourneyStatus.paused: (JourneyStatus.active, JourneyStatus.paused),
        JourneyStatus.active: (JourneyStatus.paused, JourneyStatus.active),
        JourneyStatus.stopped: (JourneyStatus.active, JourneyStatus.paused, JourneyStatus.stopped),
    }[new_status]
    if journey.status not in allowed:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"journey {key!r} is {journey.status}; it cannot become {new_status}",
        )
    journey.status, journey.updated_at = new_status, utcnow()
    session.add(journey)
    # Commit first: a send activity re-reads the status, so no enrollment slips past it.
    await session.commit()
    signalled = await notify_journey_status(session, temporal, journey, new_status)
    return JourneyStatusResult(key=key, status=new_status, enrollments_signalled=signalled)


@router.post("/{key}/pause", response_model=JourneyStatusResult)
async def pause_journey(
    key: JourneyKey, session: SessionDep, temporal: TemporalDep
) -> JourneyStatusResult:
    """Hold every enrollment before its next send; new contacts still enter."""
    return await _set_status(key, JourneyStatus.paused, session, temporal)


@router.post("/{key}/resume", response_model=JourneyStatusResult)
async def resume_journey(
    key: JourneyKey, session: SessionDep, temporal: TemporalDep
) -> JourneyStatusResult:
    """Let held enrollments go on where they were."""
    return await _set_status(key, JourneyStatus.active, session, temporal)


@router.post("/{key}/stop", response_model=JourneyStatusResult)
async def stop_journey(
    key: JourneyKey, session: SessionDep, temporal: TemporalDep
) -> JourneyStatusResult:
    """End every enrollment now; the journey takes no new contacts."""
    return await _set_status(key, JourneyStatus.stopped, session, temporal)
