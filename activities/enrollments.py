"""Enrollments: starting a contact's run of a journey (idempotent, re-entry aware), and
recording what the run did. Used by the API, event triggers and the ``enroll`` step."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections import OrderedDict
from datetime import timedelta
from typing import Any

from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select, update
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio import activity
from temporalio.client import Client
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import WorkflowAlreadyStartedError

from activities.snapshots import contact_snapshot, snapshot
from models.contracts import (
    SA_CONTACT,
    SA_JOURNEY,
    SA_STATUS,
    SA_VERSION,
    ContactSnapshot,
    EnrollInput,
    EnrollResult,
    EventSignal,
    FinishEnrollmentInput,
    JourneyInput,
    RecordVariantInput,
    journey_workflow_id,
)
from models.db import session_scope
from models.journey import JourneyDocument, ReentryAfter, parse_journey
from models.listening import listening_of
from models.tables import (
    Contact,
    Enrollment,
    EnrollmentStatus,
    Event,
    Journey,
    JourneyStatus,
    JourneyVersion,
    utcnow,
)
from settings import Settings

log = logging.getLogger(__name__)


class EnrollmentRefused(Exception):
    """The journey takes no new contacts (draft or stopped)."""


# Published versions never change, so each process parses a version's document once.
_PARSED: OrderedDict[uuid.UUID, JourneyDocument] = OrderedDict()
_PARSED_MOST = 256


def parsed_version(version: JourneyVersion) -> JourneyDocument:
    """The version's document, parsed (cached by version id)."""
    document = _PARSED.get(version.id)
    if document is None:
        document = parse_journey(version.document)
        _PARSED[version.id] = document
        while len(_PARSED) > _PARSED_MOST:
            _PARSED.popitem(last=False)
    else:
        _PARSED.move_to_end(version.id)
    return document


def refuse_closed(journey: Journey) -> None:
    """Raise ``EnrollmentRefused`` unless the journey takes new contacts."""
    if journey.status not in (JourneyStatus.active, JourneyStatus.paused):
        raise EnrollmentRefused(
            f"journey {journey.key!r} is {journey.status}: "
            + (
                "publish it before enrolling"
                if journey.status == JourneyStatus.draft
                else "it takes no new contacts"
            )
        )


async def current_version(session: AsyncSession, journey: Journey) -> JourneyVersion:
    return (
        await session.exec(
            select(JourneyVersion)
            .where(JourneyVersion.journey_id == journey.id)
            .where(JourneyVersion.version == journey.current_version)
        )
    ).one()


def cooling_down(document: JourneyDocument, latest: Enrollment) -> bool:
    """Whether the journey's re-entry policy keeps a contact out, given its ended last run."""
    if document.reentry == "never":
        return True
    if isinstance(document.reentry, ReentryAfter) and latest.ended_at is not None:
        assert document.cooldown is not None
        return utcnow() - latest.ended_at < document.cooldown
    return False


def new_enrollment_values(
    journey: Journey,
    version: JourneyVersion,
    contact_id: uuid.UUID,
    *,
    run_key: str = "",
    trigger: dict[str, Any] | None = None,
    trigger_event_id: uuid.UUID | None = None,
) -> dict[str, Any]:
    """The columns of a new active enrollment row."""
    return {
        "id": uuid.uuid4(),
        "journey_id": journey.id,
        "journey_version_id": version.id,
        "contact_id": contact_id,
        "run_key": run_key,
        "workflow_id": journey_workflow_id(journey.key, str(contact_id), run_key),
        "status": EnrollmentStatus.active,
        "trigger": trigger,
        "trigger_event_id": trigger_event_id,
        "started_at": utcnow(),
    }


async def enroll(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    journey: Journey,
    contact: Contact,
    *,
    trigger: dict[str, Any] | None = None,
    run_key: str = "",
    trigger_signal: EventSignal | None = None,
) -> tuple[Enrollment, bool]:
    """Enroll a contact in a journey's current version; return (enrollment, created).

    Idempotent: the enrollment row is committed first (a partial unique index allows one
    active run per journey, contact and key value), then the workflow is started under a
    deterministic id; a retry after a crash between the two finishes the job. Re-entry
    follows the journey's policy: ``never`` returns the earlier enrollment, ``after_exit``
    and ``{after: ...}`` start a new run once the last one ended (and cooled down).
    """
    refuse_closed(journey)
    version = await current_version(session, journey)
    document = parsed_version(version)
    latest = await _latest_enrollment(session, journey.id, contact.id, run_key)
    if latest is not None and latest.status == EnrollmentStatus.active:
        # Finish an earlier attempt that stored the row but may not have started the run.
        started_on = await session.get(JourneyVersion, latest.journey_version_id)
        assert started_on is not None
        await _start(
            session, temporal, settings, journey, started_on, latest, trigger_signal,
            reentry=False, contact=contact,
        )  # fmt: skip
        return latest, False
    if latest is not None and cooling_down(document, latest):
        return latest, False
    values = new_enrollment_values(
        journey,
        version,
        contact.id,
        run_key=run_key,
        trigger=trigger,
        trigger_event_id=uuid.UUID(trigger_signal.event_id) if trigger_signal else None,
    )
    inserted = await session.exec(
        insert(Enrollment).values(**values).on_conflict_do_nothing().returning(col(Enrollment.id))
    )
    created = inserted.first() is not None
    await session.commit()
    if not created:
        # Another request enrolled this contact meanwhile; that one starts the run.
        current = await _latest_enrollment(session, journey.id, contact.id, run_key)
        assert current is not None
        return current, False
    # The row as written, not read back: nothing else changes it before the run starts.
    current = Enrollment(**values)
    await _start(
        session, temporal, settings, journey, version, current, trigger_signal,
        reentry=latest is not None, contact=contact,
    )  # fmt: skip
    return current, True


async def _latest_enrollment(
    session: AsyncSession, journey_id: uuid.UUID, contact_id: uuid.UUID, run_key: str
) -> Enrollment | None:
    return (
        await session.exec(
            select(Enrollment)
            .where(Enrollment.journey_id == journey_id)
            .where(Enrollment.contact_id == contact_id)
            .where(Enrollment.run_key == run_key)
            .order_by(col(Enrollment.started_at).desc())
        )
    ).first()


async def _start(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    journey: Journey,
    version: JourneyVersion,
    enrollment: Enrollment,
    trigger_signal: EventSignal | None,
    *,
    reentry: bool,
    contact: Contact,
) -> None:
    """Start the enrollment's run and record its run id (on ``enrollment`` too)."""
    # The segments cost a query; only a journey whose conditions read them needs them.
    if listening_of(parsed_version(version)).segments:
        view = await contact_snapshot(session, contact)
    else:
        view = snapshot(contact)
    run_id = await start_run(
        temporal, settings, journey, version, enrollment, view, trigger_signal, reentry=reentry
    )
    if enrollment.run_id is None and run_id:
        # The same session as the caller's: a second connection per request could
        # exhaust the pool under a burst of concurrent enrollments.
        await session.exec(
            update(Enrollment).where(col(Enrollment.id) == enrollment.id).values(run_id=run_id)
        )
        await session.commit()
        enrollment.run_id = run_id


async def start_run(
    temporal: Client,
    settings: Settings,
    journey: Journey,
    version: JourneyVersion,
    enrollment: Enrollment,
    view: ContactSnapshot,
    trigger_signal: EventSignal | None,
    *,
    reentry: bool,
    eager: bool = False,
) -> str | None:
    """Start the enrollment's workflow with its stored trigger (or attach to its run when
    that runs already); return the run id, or None when a run under that workflow id
    already ended (the enrollment row says how). A re-entry waits for the previous run
    under the same workflow id to close. ``eager``: called inside a worker through its own
    client, so the server may hand the run's first task straight back to this worker
    (eager workflow start) instead of through its task queue."""
    from workflows.journey import JourneyWorkflow

    document = parsed_version(version)
    attributes: list[SearchAttributePair[Any]] = [
        SearchAttributePair(SA_JOURNEY, journey.key),
        SearchAttributePair(SA_VERSION, version.version),
        SearchAttributePair(SA_CONTACT, str(enrollment.contact_id)),
    ]
    if settings.progress_search_attributes:
        # Set only when kept current: a stale "active" would mislead a search.
        attributes.append(SearchAttributePair(SA_STATUS, "active"))
    options: dict[str, Any] = {}
    if trigger_signal is not None:
        options = {"start_signal": "event", "start_signal_args": [trigger_signal]}
    # A re-entry must not attach to the previous run while it is still closing.
    conflict = WorkflowIDConflictPolicy.FAIL if reentry else WorkflowIDConflictPolicy.USE_EXISTING
    reuse = (
        WorkflowIDReusePolicy.REJECT_DUPLICATE
        if document.reentry == "never"
        else WorkflowIDReusePolicy.ALLOW_DUPLICATE
    )
    for attempt in range(50):
        try:
            handle = await temporal.start_workflow(
                JourneyWorkflow.run,
                JourneyInput(
                    enrollment_id=str(enrollment.id),
                    journey_key=journey.key,
                    journey_version=version.version,
                    document=version.document,
                    contact_id=str(enrollment.contact_id),
                    trigger=enrollment.trigger,
                    run_key=enrollment.run_key,
                    contact=view,
                    progress_search_attributes=settings.progress_search_attributes,
                ),
                id=enrollment.workflow_id,
                task_queue=settings.task_queue,
                id_conflict_policy=conflict,
                id_reuse_policy=reuse,
                search_attributes=TypedSearchAttributes(attributes),
                static_summary=(
                    f"{journey.name} (v{version.version}) for contact {enrollment.contact_id}"
                ),
                static_details=(
                    f"Journey **{journey.key}** version {version.version}\n\n"
                    f"Contact `{enrollment.contact_id}`, enrollment `{enrollment.id}`"
                    + (f", key `{enrollment.run_key}`" if enrollment.run_key else "")
                ),
                request_eager_start=eager and trigger_signal is None,
                **options,
            )
        except WorkflowAlreadyStartedError:
            if not reentry:
                return None
            await asyncio.sleep(0.1 * (attempt + 1))
            continue
        return handle.first_execution_run_id or handle.result_run_id
    raise RuntimeError(f"the previous run of {enrollment.workflow_id} did not close in time")


async def start_unstarted(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    *,
    older_than: timedelta,
    limit: int,
) -> list[uuid.UUID]:
    """Start the runs of active enrollments whose workflow never started (Temporal was down
    when they were enrolled and nobody retried); return their ids.

    An enrollment with no run id is either not started or started by a process that died
    before recording it; starting again under the same workflow id attaches to a live run
    (``USE_EXISTING``), so this is safe to repeat. Each row is claimed alone with ``SKIP
    LOCKED`` and its run id committed with the claim, so drains on many hosts never start
    the same one twice. A run enrolled by an event gets that event again.
    """
    started: list[uuid.UUID] = []
    while len(started) < limit:
        enrollment = (
            await session.exec(
                select(Enrollment)
                .where(Enrollment.status == EnrollmentStatus.active)
                .where(col(Enrollment.run_id).is_(None))
                .where(col(Enrollment.started_at) < utcnow() - older_than)
                .where(col(Enrollment.id).not_in(started))
                .order_by(col(Enrollment.started_at))
                .limit(1)
                .with_for_update(skip_locked=True)
            )
        ).first()
        if enrollment is None:
            break
        journey = await session.get(Journey, enrollment.journey_id)
        version = await session.get(JourneyVersion, enrollment.journey_version_id)
        assert journey is not None and version is not None
        trigger_signal = None
        if enrollment.trigger_event_id is not None:
            event = await session.get(Event, enrollment.trigger_event_id)
            if event is not None:
                trigger_signal = EventSignal(
                    event_id=str(event.id),
                    name=event.name,
                    properties=event.properties,
                    occurred_at=event.occurred_at.isoformat(),
                )
        contact = await session.get(Contact, enrollment.contact_id)
        assert contact is not None  # enrollments are deleted with their contact
        # Not as a re-entry even when it is one: the previous run ended before this row was
        # written, longer ago than ``older_than``, and the API's own start may be racing
        # this one (attaching to it is right; failing on it would wait for it to close).
        await _start(
            session, temporal, settings, journey, version, enrollment, trigger_signal,
            reentry=False, contact=contact,
        )  # fmt: skip
        await session.refresh(enrollment)
        if enrollment.run_id is None:
            # The run already ended (terminated by hand): record it, so it is not retried
            # and its events count it as closed.
            described = await temporal.get_workflow_handle(enrollment.workflow_id).describe()
            enrollment.run_id = described.run_id
            session.add(enrollment)
        await session.commit()
        log.info("started the run of enrollment %s, which had not started", enrollment.id)
        started.append(enrollment.id)
    return started


class EnrollmentActivities:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.database_url = settings.database_url

    @activity.defn(name="finish_enrollment")
    async def finish_enrollment(self, input: FinishEnrollmentInput) -> None:
        """Mark the enrollment ended; idempotent (an ended enrollment keeps its first end)."""
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(Enrollment)
                .where(col(Enrollment.id) == uuid.UUID(input.enrollment_id))
                .where(col(Enrollment.status) == EnrollmentStatus.active)
                .values(
                    status=EnrollmentStatus(input.status),
                    exit_reason=input.exit_reason,
                    goal=input.goal,
                    ended_at=utcnow(),
                )
            )

    @activity.defn(name="record_variant")
    async def record_variant(self, input: RecordVariantInput) -> None:
        async with session_scope(self.database_url) as session:
            await session.exec(
                update(Enrollment)
                .where(col(Enrollment.id) == uuid.UUID(input.enrollment_id))
                .values(variant=input.variant)
            )

    @activity.defn(name="enroll_contact")
    async def enroll_contact(self, input: EnrollInput) -> EnrollResult:
        """The ``enroll`` step: start this contact in another journey."""
        async with session_scope(self.database_url) as session:
            journey = (
                await session.exec(select(Journey).where(Journey.key == input.journey_key))
            ).first()
            contact = await session.get(Contact, uuid.UUID(input.contact_id))
            if journey is None:
                return EnrollResult(False, reason=f"no journey {input.journey_key!r}")
            if contact is None or contact.erased_at is not None:
                return EnrollResult(False, reason="contact erased")
            try:
                enrollment, created = await enroll(
                    session,
                    activity.client(),
                    self.settings,
                    journey,
                    contact,
                    trigger=input.trigger,
                )
            except EnrollmentRefused as refused:
                return EnrollResult(False, reason=str(refused))
        return EnrollResult(
            created, str(enrollment.id), None if created else f"already {enrollment.status}"
        )
