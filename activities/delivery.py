"""Getting events and contact changes to the journeys: signals, triggered enrollments, and the
audience refresh (scores, lifecycle stages, segments) whose derived events go the same way.

Used by the API (events, webhooks, contact changes), by activities that change contacts and
by the inbox drain (activities/inbox.py), so it lives with the I/O code. Every function works
on the caller's session; the caller commits what it stored before calling ``dispatch_*``, so
nothing acts on an uncommitted row. An event's ``delivered_at`` is set only once every running
journey of its contact got it and the journeys it triggers are started; until then the drain
retries it, so ``or_defer`` lets the API acknowledge a stored event while Temporal is down.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
import weakref
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY
from sqlmodel import col, select
from sqlmodel.ext.asyncio.session import AsyncSession
from temporalio.client import Client
from temporalio.service import RPCError, RPCStatusCode

from activities.audience import AudienceChanges, refresh_audience
from activities.counters import SIGNALS_SENT
from activities.enrollments import EnrollmentRefused, enroll
from activities.snapshots import contact_snapshot
from models.conditions import evaluate
from models.contracts import ContactChangedSignal, EventSignal, JourneyStatusSignal
from models.journey import parse_journey
from models.listening import Listening, listening_of
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
_CHUNK = 10_000
# Contacts signalled at once when a batch of events is delivered.
SIGNAL_LANES = 32
T = TypeVar("T")
# Statuses that say Temporal (or the way to it) is failing, not that the request was wrong.
TRANSIENT_STATUSES = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.RESOURCE_EXHAUSTED,
        RPCStatusCode.ABORTED,
        RPCStatusCode.INTERNAL,
        RPCStatusCode.UNKNOWN,
    }
)
# After a failure, requests skip Temporal this long: an unreachable server costs each call
# about 10 s of client retries, which webhook senders would count as a timeout.
OUTAGE_PAUSE_SECONDS = 5.0
_paused_until: weakref.WeakKeyDictionary[Client, float] = weakref.WeakKeyDictionary()


def temporal_unavailable(err: BaseException) -> bool:
    """Whether ``err`` means Temporal could not be reached (worth retrying later)."""
    if isinstance(err, RPCError):
        return err.status in TRANSIENT_STATUSES
    if isinstance(err, RuntimeError):
        # A lazily connected client's first call raises this when the server is down.
        return str(err).startswith("Failed client connect")
    return isinstance(err, OSError | TimeoutError)


async def or_defer(
    session: AsyncSession,
    temporal: Client,
    work: Callable[[], Awaitable[T]],
    what: str,
) -> T | None:
    """Run ``work`` (signalling and starting journeys about rows already committed); if
    Temporal fails, log it and return None: the events stay undelivered for the drain.

    Temporal errors of any kind are deferred, since the caller's rows are committed and
    must be acknowledged; other errors propagate. After a failure, calls for the next
    ``OUTAGE_PAUSE_SECONDS`` skip Temporal at once. The session is rolled back on failure,
    which expires its objects: read what the response needs before calling this.
    """
    if time.monotonic() < _paused_until.get(temporal, 0.0):
        log.info("Temporal recently unreachable; %s left for the inbox drain", what)
        return None
    try:
        return await work()
    except Exception as err:
        deferrable = isinstance(err, RPCError | JourneyNotStarted) or temporal_unavailable(err)
        if not deferrable:
            raise
        await session.rollback()
        if isinstance(err, JourneyNotStarted):
            log.info("%s; %s left for the inbox drain", err, what)
        elif temporal_unavailable(err):
            _paused_until[temporal] = time.monotonic() + OUTAGE_PAUSE_SECONDS
            log.warning("Temporal unreachable (%s); %s left for the inbox drain", err, what)
        else:
            log.error("Temporal refused %s (%s); left for the inbox drain", what, err)
        return None


async def _signal_active(
    session: AsyncSession,
    temporal: Client,
    signal_name: str,
    arg: Any,
    hears: Callable[[Listening], bool] | None = None,
    skip: str | None = None,
    **where: Any,
) -> int:
    """Send a signal to every active enrollment matching ``where`` whose journey version
    ``hears`` it (None: all), except workflow ``skip``; return how many got it.

    An event for a journey not started yet raises ``JourneyNotStarted`` (it would be
    missed); other signals are skipped, as a journey reads the contact and the journey's
    status when it starts."""
    query = select(Enrollment.workflow_id, Enrollment.run_id, Enrollment.journey_version_id).where(
        Enrollment.status == EnrollmentStatus.active
    )
    for name, value in where.items():
        query = query.where(getattr(Enrollment, name) == value)
    delivered = 0
    for workflow_id, run_id, version_id in (await session.exec(query)).all():
        if workflow_id == skip or (
            hears is not None and not hears(await listening(session, version_id))
        ):
            continue
        started = run_id is not None or signal_name != "event"
        if await _signal(temporal, workflow_id, signal_name, arg, started=started):
            delivered += 1
    return delivered


_listening: dict[uuid.UUID, Listening] = {}


async def listening(session: AsyncSession, version_id: uuid.UUID) -> Listening:
    """What runs of this journey version act on; versions are immutable, so it is cached."""
    if version_id not in _listening:
        version = await session.get(JourneyVersion, version_id)
        assert version is not None
        _listening[version_id] = listening_of(parse_journey(version.document))
    return _listening[version_id]


def event_signal(event: Event) -> EventSignal:
    return EventSignal(
        event_id=str(event.id),
        name=event.name,
        properties=event.properties,
        occurred_at=event.occurred_at.isoformat(),
    )


async def deliver_event(session: AsyncSession, temporal: Client, event: Event) -> int:
    """Signal an event to each running journey of its contact; return how many got it.

    Journeys de-duplicate by event id, so delivering twice is harmless.
    """
    if event.contact_id is None:
        return 0
    delivered = await _signal_active(
        session, temporal, "event", event_signal(event), _hears(event), contact_id=event.contact_id
    )
    event.delivered_at = utcnow()
    session.add(event)
    return delivered


async def start_triggered(
    session: AsyncSession, temporal: Client, settings: Settings, event: Event
) -> list[str]:
    """Enroll the event's contact in every journey this event triggers; return their keys.

    Racing events are safe: the enrollment row's unique index and the deterministic
    workflow id leave exactly one run per (journey, contact, key value).
    """
    if event.contact_id is None:
        return []
    contact = await session.get(Contact, event.contact_id)
    journeys = (
        await session.exec(
            select(Journey)
            .where(Journey.trigger_event == event.name)
            .where(col(Journey.status).in_([JourneyStatus.active, JourneyStatus.paused]))
        )
    ).all()
    started = []
    for journey in journeys:
        version = (
            await session.exec(
                select(JourneyVersion)
                .where(JourneyVersion.journey_id == journey.id)
                .where(JourneyVersion.version == journey.current_version)
            )
        ).one()
        trigger = parse_journey(version.document).trigger
        if trigger is None or contact is None or not trigger.matches(event.properties):
            continue
        if trigger.where is not None and not evaluate(
            trigger.where, {}, {"properties": event.properties}
        ):
            continue
        run_key = ""
        if trigger.key:
            value = event.properties.get(trigger.key)
            if value is None or value == "":
                log.info("event %s lacks key %s for journey %s", event.id, trigger.key, journey.key)
                continue
            run_key = str(value)
        signal = event_signal(event)
        try:
            _, created = await enroll(
                session,
                temporal,
                settings,
                journey,
                contact,
                trigger={"event": event.name, "id": signal.event_id, **signal.__dict__},
                run_key=run_key,
                trigger_signal=signal,
            )
        except EnrollmentRefused:
            continue
        if created:
            started.append(journey.key)
    return started


async def notify_contact_changed(
    session: AsyncSession, temporal: Client, contact: Contact, skip: str | None = None
) -> int:
    """Tell the contact's running journeys that read the profile between reads of their own
    (``skip``: the journey that made the change, which has the result already)."""
    return await _signal_active(
        session,
        temporal,
        "contact_changed",
        ContactChangedSignal(await contact_snapshot(session, contact)),
        lambda listens: listens.contact_changes,
        skip,
        contact_id=contact.id,
    )


async def notify_journey_status(
    session: AsyncSession, temporal: Client, journey: Journey, new_status: JourneyStatus
) -> int:
    return await _signal_active(
        session,
        temporal,
        "journey_status",
        JourneyStatusSignal(new_status),
        journey_id=journey.id,
    )


async def signal_and_start(
    session: AsyncSession, temporal: Client, settings: Settings, event: Event
) -> int:
    """Signal an event to its contact's running journeys and start the journeys it
    triggers; return how many got it. Does not mark it delivered (the caller does, after).

    Both halves are safe to repeat: journeys de-duplicate by event id, and a triggered
    enrollment is one run per (journey, contact, key value).
    """
    if event.contact_id is None:
        return 0
    delivered = await _signal_active(
        session, temporal, "event", event_signal(event), _hears(event), contact_id=event.contact_id
    )
    return delivered + len(await start_triggered(session, temporal, settings, event))


async def refresh_after_event(
    session: AsyncSession, temporal: Client, settings: Settings, event: Event
) -> None:
    """Refresh the event's contact (score, stage, segments) and dispatch what that derives
    (``segment_entered``, ``became_mql``...). Derived events change nothing further."""
    if event.contact_id is not None and event.source != "derived":
        await dispatch_contact_changes(
            session, temporal, settings, [event.contact_id], event_names={event.name}
        )


async def dispatch_event(
    session: AsyncSession, temporal: Client, settings: Settings, event: Event
) -> int:
    """Act on a stored, committed event: signal it to the contact's running journeys, start
    the journeys it triggers, mark it delivered, then refresh the contact's score, stage and
    segments and dispatch what that derives. Commits.

    Returns how many journeys got the event (signalled or started). An event already
    delivered is not delivered again.
    """
    delivered = 0
    if event.delivered_at is None:
        delivered = await signal_and_start(session, temporal, settings, event)
        event.delivered_at = utcnow()
        session.add(event)
        await session.commit()
    await refresh_after_event(session, temporal, settings, event)
    return delivered


async def dispatch_undelivered(
    session: AsyncSession, temporal: Client, settings: Settings, events: Sequence[Event]
) -> None:
    """Dispatch stored events, then refresh their contacts once (a provider batch touches
    many events of few contacts). Commits.

    A batch in which no event starts a journey goes in bulk (``deliver_events``: one query,
    contacts signalled in parallel, each contact's events in order); otherwise the events go
    in order one by one, each marked delivered as it goes, so that an event after a trigger
    reaches the run that trigger started.
    """
    if await _active_triggers(session, {e.name for e in events}):
        for event in events:
            await signal_and_start(session, temporal, settings, event)
            event.delivered_at = utcnow()
            session.add(event)
            await session.commit()
    else:
        await deliver_events(session, temporal, settings, events)
    contact_ids = {e.contact_id for e in events if e.contact_id is not None}
    if contact_ids:
        await dispatch_contact_changes(
            session, temporal, settings, contact_ids, event_names={e.name for e in events}
        )


async def dispatch_contact_changes(
    session: AsyncSession,
    temporal: Client,
    settings: Settings,
    contact_ids: Collection[uuid.UUID] | None,
    *,
    event_names: Collection[str] | None = None,
    profile_changed: bool = False,
    changed_by: str | None = None,
) -> AudienceChanges:
    """After contacts changed (``profile_changed``: attributes, tags, score...) or got
    events (``event_names``): refresh their scores, stages and segments, tell their running
    journeys (``contact_changed``), and dispatch the derived events. Commits.

    ``contact_ids`` None means every contact (the scheduled refresh, a bulk import).
    """
    changes = await refresh_audience(
        session,
        now=utcnow(),
        contact_ids=contact_ids,
        event_names=event_names,
        profile_changed=profile_changed,
    )
    await session.commit()
    notify = set(changes.changed_contacts)
    if profile_changed and contact_ids is not None:
        notify |= set(contact_ids)
    for contact_id in await _hearing_contact_changes(session, notify):
        contact = await session.get(Contact, contact_id)
        if contact is not None and contact.erased_at is None:
            await notify_contact_changed(session, temporal, contact, changed_by)
    await deliver_events(session, temporal, settings, changes.derived_events)
    return changes


async def _running(
    session: AsyncSession, contact_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[tuple[str, uuid.UUID, bool]]]:
    """The active runs of these contacts, by contact: (workflow id, journey version id,
    whether its run id is recorded), one query per chunk of contacts."""
    running: dict[uuid.UUID, list[tuple[str, uuid.UUID, bool]]] = defaultdict(list)
    for start in range(0, len(contact_ids), _CHUNK):
        rows = await session.exec(
            select(
                Enrollment.contact_id,
                Enrollment.workflow_id,
                Enrollment.journey_version_id,
                Enrollment.run_id,
            )
            .where(Enrollment.status == EnrollmentStatus.active)
            .where(
                col(Enrollment.contact_id) == sa.any_(_uuids(contact_ids[start : start + _CHUNK]))
            )
        )
        for contact_id, workflow_id, version_id, run_id in rows.all():
            running[contact_id].append((workflow_id, version_id, run_id is not None))
    return running


async def _hearing_contact_changes(
    session: AsyncSession, contact_ids: Collection[uuid.UUID]
) -> list[uuid.UUID]:
    """Those of these contacts with a running journey that reads the profile between its
    own reads, found without a query per contact (a refresh may change 100,000 contacts,
    most with no such journey)."""
    wanted = list(contact_ids)
    running = await _running(session, wanted)
    hearing = []
    for contact_id in wanted:
        versions = {version for _, version, _ in running.get(contact_id, [])}
        if any([(await listening(session, v)).contact_changes for v in versions]):
            hearing.append(contact_id)
    return hearing


async def deliver_events(
    session: AsyncSession, temporal: Client, settings: Settings, events: Sequence[Event]
) -> int:
    """Deliver many stored, committed events at once (a segment refresh may derive
    thousands): one query finds the running journeys of all their contacts, only those
    are signalled, and journeys these events trigger are started. Commits."""
    if not events:
        return 0
    ids = [e.id for e in events]
    for start in range(0, len(ids), _CHUNK):
        # Held until they are marked delivered: the inbox drain (SKIP LOCKED) leaves a batch
        # that takes longer than its grace period alone instead of signalling it twice.
        await (await session.connection()).execute(
            sa.select(col(Event.id))
            .where(col(Event.id) == sa.any_(_uuids(ids[start : start + _CHUNK])))
            .with_for_update()
        )
    contact_ids = list({e.contact_id for e in events if e.contact_id is not None})
    running = await _running(session, contact_ids)
    hearing = {v: await listening(session, v) for runs in running.values() for _, v, _ in runs}
    by_contact: dict[uuid.UUID, list[Event]] = defaultdict(list)
    for event in events:
        if event.contact_id is not None:
            by_contact[event.contact_id].append(event)
    lanes = asyncio.Semaphore(SIGNAL_LANES)
    waiting: set[uuid.UUID] = set()

    async def signal_contact(contact_id: uuid.UUID) -> int:
        got = 0
        async with lanes:
            for event in by_contact[contact_id]:  # in order, for each contact
                for workflow_id, version_id, started in running[contact_id]:
                    if not hearing[version_id].hears(event.name):
                        continue
                    try:
                        if await _signal(
                            temporal, workflow_id, "event", event_signal(event), started=started
                        ):
                            got += 1
                    except JourneyNotStarted:
                        waiting.add(event.id)  # left undelivered: the inbox drain retries it
        return got

    results = await asyncio.gather(
        *(signal_contact(c) for c in by_contact if c in running), return_exceptions=True
    )
    for result in results:
        if isinstance(result, BaseException):
            raise result  # the first failure, as a sequential delivery would have raised
    delivered = sum(r for r in results if isinstance(r, int))
    now = utcnow()
    ids = [e.id for e in events if e.id not in waiting]
    for start in range(0, len(ids), _CHUNK):
        await (await session.connection()).execute(
            sa.update(Event)
            .where(col(Event.id) == sa.any_(_uuids(ids[start : start + _CHUNK])))
            .values(delivered_at=now)
        )
    await session.commit()
    triggered = await _active_triggers(session, {e.name for e in events})
    for event in events:
        if event.name in triggered:
            delivered += len(await start_triggered(session, temporal, settings, event))
    return delivered


async def _active_triggers(session: AsyncSession, names: Collection[str]) -> set[str]:
    """Which of these event names start a journey that takes contacts."""
    rows = await session.exec(
        select(Journey.trigger_event)
        .where(col(Journey.trigger_event).in_(names))
        .where(col(Journey.status).in_([JourneyStatus.active, JourneyStatus.paused]))
    )
    return {name for name in rows.all() if name is not None}


def _hears(event: Event) -> Callable[[Listening], bool]:
    return lambda listens: listens.hears(event.name)


def _uuids(values: Sequence[uuid.UUID]) -> Any:
    return sa.bindparam(None, list(values), type_=ARRAY(sa.Uuid))


class JourneyNotStarted(Exception):
    """An active enrollment's workflow was not found and it has no run id: its start failed
    (Temporal was down) or is under way. The event must stay undelivered until it runs."""


async def _signal(
    temporal: Client, workflow_id: str, name: str, arg: Any, *, started: bool = True
) -> bool:
    """Signal one journey; False if its run already closed. ``started`` False (no run id
    recorded yet) makes a missing workflow raise ``JourneyNotStarted`` instead."""
    try:
        await temporal.get_workflow_handle(workflow_id).signal(name, arg)
        SIGNALS_SENT.labels(name).inc()
        return True
    except RPCError as err:
        if err.status != RPCStatusCode.NOT_FOUND:
            raise
        if not started:
            raise JourneyNotStarted(f"journey {workflow_id} has not started yet") from None
        log.info("workflow %s already closed; %s not delivered", workflow_id, name)
        return False
