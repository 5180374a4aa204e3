"""The audience refresh: lead scores, lifecycle stages and segment membership, kept current.

One set-based pass, in SQL, over some contacts (after their events or profile changed) or
over all of them (the scheduled refresh, which also catches time-based conditions such as
"no activity in 30 days", decaying scores, and bulk imports):

1. scores: ``score_adjustment`` plus the scoring rules' points (``models.scoring``);
2. lifecycle stages advanced by score thresholds (``became_<stage>`` events);
3. segment membership, segment by segment in dependency order (a segment that names
   another is refreshed after it), as INSERT ... ON CONFLICT / DELETE ... RETURNING on
   ``segment_members``: concurrent refreshes of one contact derive each change once.

Entering and leaving a segment are the events ``segment_entered`` / ``segment_exited``
(property ``segment``). Derived events are stored here, in the caller's transaction; the
caller delivers them after the commit (``activities.delivery``).

A scoring rule that names a segment sees the membership before this pass's segment step;
the next refresh catches it up.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from pydantic import TypeAdapter
from sqlalchemy.dialects.postgresql import ARRAY, insert
from sqlmodel import select
from sqlmodel.ext.asyncio.session import AsyncSession

from models.conditions import Condition, Inputs, inputs_of
from models.conditions_sql import compile_condition, compile_on_event
from models.journey import SEGMENT_ENTERED, SEGMENT_EXITED
from models.scoring import (
    LIFECYCLE_STAGES,
    ScoringModelDocument,
    ScoringRule,
    became_event,
    parse_scoring,
)
from models.tables import Contact, Event, ScoringModel, Segment, SegmentMember

CONDITION: TypeAdapter[Condition] = TypeAdapter(Condition)
DERIVED = "derived"
_CONTACTS: sa.Table = Contact.__table__  # type: ignore[attr-defined]
_EVENTS: sa.Table = Event.__table__  # type: ignore[attr-defined]
_MEMBERS: sa.Table = SegmentMember.__table__  # type: ignore[attr-defined]
_SEGMENTS: sa.Table = Segment.__table__  # type: ignore[attr-defined]
_INSERT_CHUNK = 5_000


@dataclass
class AudienceChanges:
    changed_contacts: set[uuid.UUID] = field(default_factory=set)
    derived_events: list[Event] = field(default_factory=list)
    scores_changed: int = 0
    stages_advanced: int = 0
    segments_entered: int = 0
    segments_exited: int = 0


@dataclass(frozen=True)
class SegmentDefinition:
    id: uuid.UUID
    key: str
    condition: Condition
    inputs: Inputs


class SegmentCycleError(ValueError):
    pass


def dependency_order(conditions: dict[str, Condition]) -> list[str]:
    """Segment keys so that each comes after the segments its condition names.

    Raises SegmentCycleError naming the cycle, or a reference to an unknown segment.
    """
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(key: str, path: list[str]) -> None:
        if state.get(key) == "done":
            return
        if state.get(key) == "visiting":
            cycle = [*path[path.index(key) :], key]
            raise SegmentCycleError("segments refer to each other: " + " -> ".join(cycle))
        if key not in conditions:
            raise SegmentCycleError(f"segment {path[-1]!r} names unknown segment {key!r}")
        state[key] = "visiting"
        for needed in sorted(inputs_of(conditions[key]).segments):
            visit(needed, [*path, key])
        state[key] = "done"
        order.append(key)

    for key in sorted(conditions):
        visit(key, [key])
    return order


async def load_segments(session: AsyncSession) -> list[SegmentDefinition]:
    """Every segment, in dependency order."""
    rows = (await session.exec(select(Segment))).all()
    by_key = {row.key: row for row in rows}
    conditions = {row.key: CONDITION.validate_python(row.condition) for row in rows}
    return [
        SegmentDefinition(by_key[key].id, key, conditions[key], inputs_of(conditions[key]))
        for key in dependency_order(conditions)
    ]


async def load_scoring(session: AsyncSession) -> ScoringModelDocument | None:
    row = await session.get(ScoringModel, "default")
    return parse_scoring(row.document) if row is not None else None


def _ids_param(contact_ids: Collection[uuid.UUID]) -> Any:
    # One array parameter, not one parameter per id: a bulk import may name 100,000.
    return sa.bindparam(None, list(contact_ids), type_=ARRAY(sa.Uuid))


def _live(contacts: sa.Table | Any, contact_ids: Collection[uuid.UUID] | None) -> list[Any]:
    live = [contacts.c.erased_at.is_(None), contacts.c.merged_into.is_(None)]
    if contact_ids is not None:
        live.append(contacts.c.id == sa.any_(_ids_param(contact_ids)))
    return live


def _rule_points(rule: ScoringRule, now: datetime) -> Any:
    """The points one rule gives the contact of the current ``contacts`` row."""
    points = sa.literal(rule.points, sa.Numeric)
    if rule.if_ is not None:
        return sa.case((compile_condition(rule.if_, now=now), points), else_=sa.literal(0))
    events = _EVENTS.alias()
    matching = [
        events.c.contact_id == _CONTACTS.c.id,
        events.c.name == sa.bindparam(None, rule.event, type_=sa.Text),
    ]
    if rule.window is not None:
        matching.append(
            events.c.occurred_at
            >= sa.bindparam(None, now - rule.window, type_=sa.DateTime(timezone=True))
        )
    if rule.where is not None:
        matching.append(compile_on_event(rule.where, events.c.properties, now=now))
    if rule.half_life is not None:
        age = sa.func.extract(
            "epoch",
            sa.bindparam(None, now, type_=sa.DateTime(timezone=True)) - events.c.occurred_at,
        )
        half_life = rule.half_life_delta.total_seconds()
        # A future-dated event counts in full, not more.
        each = points * sa.func.power(0.5, sa.func.greatest(age, 0) / half_life)
    else:
        each = points
    total: Any = (
        sa.select(sa.func.coalesce(sa.func.sum(each), 0))
        .select_from(events)
        .where(*matching)
        .correlate(_CONTACTS)
        .scalar_subquery()
    )
    if rule.max_points is not None:
        cap = sa.literal(rule.max_points, sa.Numeric)
        total = sa.func.greatest(sa.func.least(total, cap), -cap)
    return total


async def refresh_scores(
    session: AsyncSession,
    scoring: ScoringModelDocument,
    now: datetime,
    contact_ids: Collection[uuid.UUID] | None,
) -> set[uuid.UUID]:
    """Recompute scores; return the contacts whose score changed."""
    points: Any = sa.literal(0, sa.Numeric)
    for rule in scoring.rules:
        points = points + _rule_points(rule, now)
    new_score = sa.cast(_CONTACTS.c.score_adjustment + sa.func.round(points), sa.Integer)
    computed = (
        sa.select(_CONTACTS.c.id, new_score.label("new_score"))
        .where(*_live(_CONTACTS, contact_ids))
        .subquery()
    )
    target: Any = _CONTACTS.alias("target")
    changed = await (await session.connection()).execute(
        sa.update(target)
        .where(target.c.id == computed.c.id, target.c.score != computed.c.new_score)
        .values(score=computed.c.new_score)
        .returning(target.c.id)
    )
    return set(changed.scalars().all())


async def advance_stages(
    session: AsyncSession,
    scoring: ScoringModelDocument,
    contact_ids: Collection[uuid.UUID] | None,
) -> list[tuple[uuid.UUID, str, str, int]]:
    """Move contacts forward to the stage their score reaches; (contact, from, to, score)."""
    if not scoring.thresholds:
        return []
    stages = sa.literal(list(LIFECYCLE_STAGES), ARRAY(sa.Text))
    reached = sa.case(
        *(
            (_CONTACTS.c.score >= low, sa.literal(stage, sa.Text))
            for stage, low in sorted(
                scoring.thresholds.items(), key=lambda item: -LIFECYCLE_STAGES.index(item[0])
            )
        ),
        else_=sa.null(),
    )
    computed = (
        sa.select(
            _CONTACTS.c.id,
            _CONTACTS.c.lifecycle_stage.label("old_stage"),
            reached.label("new_stage"),
        )
        .where(*_live(_CONTACTS, contact_ids))
        .subquery()
    )
    target: Any = _CONTACTS.alias("target")
    rank_new = sa.func.array_position(stages, computed.c.new_stage)
    rank_old = sa.func.coalesce(sa.func.array_position(stages, computed.c.old_stage), 1)
    moved = await (await session.connection()).execute(
        sa.update(target)
        .where(target.c.id == computed.c.id, computed.c.new_stage.is_not(None), rank_new > rank_old)
        .values(lifecycle_stage=computed.c.new_stage)
        .returning(target.c.id, computed.c.old_stage, computed.c.new_stage, target.c.score)
    )
    return [(row[0], row[1], row[2], row[3]) for row in moved.all()]


async def refresh_segment(
    session: AsyncSession,
    segment: SegmentDefinition,
    now: datetime,
    contact_ids: Collection[uuid.UUID] | None,
) -> tuple[list[uuid.UUID], list[uuid.UUID]]:
    """Bring one segment's members up to date; return (entered, exited) contact ids."""
    condition = compile_condition(segment.condition, now=now)
    segment_id = sa.bindparam(None, segment.id, type_=sa.Uuid)
    entering = sa.select(
        segment_id, _CONTACTS.c.id, sa.bindparam(None, now, type_=sa.DateTime(timezone=True))
    ).where(*_live(_CONTACTS, contact_ids), condition)
    # Leavers first: the anti-join then runs on the members as they were (with their
    # statistics), not on thousands of rows the insert below adds in this transaction, for
    # which the planner has none (a new segment of 100,000 sat in this DELETE for over a
    # minute the other way).
    still_in = (
        sa.select(sa.literal(1))
        .select_from(_CONTACTS)
        .where(_CONTACTS.c.id == _MEMBERS.c.contact_id, *_live(_CONTACTS, None), condition)
        .correlate(_MEMBERS)
    )
    leaving = [_MEMBERS.c.segment_id == segment_id, ~sa.exists(still_in)]
    if contact_ids is not None:
        leaving.append(_MEMBERS.c.contact_id == sa.any_(_ids_param(contact_ids)))
    exited = await (await session.connection()).execute(
        sa.delete(_MEMBERS).where(*leaving).returning(_MEMBERS.c.contact_id)
    )
    entered = await (await session.connection()).execute(
        insert(_MEMBERS)
        .from_select(["segment_id", "contact_id", "entered_at"], entering)
        .on_conflict_do_nothing()
        .returning(_MEMBERS.c.contact_id)
    )
    return list(entered.scalars().all()), list(exited.scalars().all())


async def _store_derived(
    session: AsyncSession, rows: Sequence[tuple[uuid.UUID, str, dict[str, Any]]], now: datetime
) -> list[Event]:
    """Store derived events (contact, name, properties) in one statement; return them.

    A refresh of every contact may derive 100,000 events: one INSERT ... SELECT FROM
    unnest() instead of a row at a time, and no validation of rows made right here."""
    events: list[Event] = []
    for start in range(0, len(rows), _INSERT_CHUNK):
        chunk = rows[start : start + _INSERT_CHUNK]
        ids = [uuid.uuid4() for _ in chunk]
        keys = [f"{DERIVED}:{name}:{i}" for i, (_, name, _) in zip(ids, chunk, strict=True)]
        params = {
            "ids": ids,
            "keys": keys,
            "contacts": [contact for contact, _, _ in chunk],
            "names": [name for _, name, _ in chunk],
            "properties": [json.dumps(props) for _, _, props in chunk],
            "now": now,
        }
        await (await session.connection()).execute(_INSERT_DERIVED, params)
        events.extend(
            Event.model_construct(
                id=i, idempotency_id=key, contact_id=contact, name=name, properties=props,
                occurred_at=now, received_at=now, source=DERIVED, delivered_at=None,
            )
            for i, key, (contact, name, props) in zip(ids, keys, chunk, strict=True)
        )  # fmt: skip
    return events


_INSERT_DERIVED = sa.text(
    """
    INSERT INTO events (id, idempotency_id, contact_id, name, properties, occurred_at,
                        received_at, source)
    SELECT id, key, contact, name, properties::jsonb, :now, :now, 'derived'
    FROM unnest(CAST(:ids AS uuid[]), CAST(:keys AS text[]), CAST(:contacts AS uuid[]),
                CAST(:names AS text[]), CAST(:properties AS text[]))
         AS derived(id, key, contact, name, properties)
    """
)


def _needs_refresh(
    segment: SegmentDefinition,
    full: bool,
    event_names: Collection[str],
    profile_changed: bool,
    dirty: set[str],
) -> bool:
    inputs = segment.inputs
    return (
        full
        or bool(inputs.events & set(event_names))
        or (inputs.profile and profile_changed)
        or bool(inputs.segments & dirty)
    )


async def refresh_audience(
    session: AsyncSession,
    *,
    now: datetime,
    contact_ids: Collection[uuid.UUID] | None = None,
    event_names: Collection[str] | None = None,
    profile_changed: bool = False,
) -> AudienceChanges:
    """Refresh scores, stages and segments of ``contact_ids`` (None: every contact).

    ``event_names`` (new events) and ``profile_changed`` say what changed, so segments
    that read neither are skipped; a refresh of every contact refreshes everything.
    Stores the derived events (not committed, not delivered) and returns them.
    """
    changes = AudienceChanges()
    full = contact_ids is None
    if contact_ids is not None and not contact_ids:
        return changes
    names = set(event_names or ())
    derived: list[tuple[uuid.UUID, str, dict[str, Any]]] = []
    scoring = await load_scoring(session)
    if scoring is not None and (scoring.rules or scoring.thresholds):
        rescored = await refresh_scores(session, scoring, now, contact_ids)
        changes.scores_changed = len(rescored)
        changes.changed_contacts |= rescored
        profile_changed = profile_changed or bool(rescored)
        for contact_id, old, new, score in await advance_stages(session, scoring, contact_ids):
            changes.stages_advanced += 1
            changes.changed_contacts.add(contact_id)
            properties = {"from": old, "to": new, "score": score}
            derived.append((contact_id, became_event(new), properties))
        profile_changed = profile_changed or changes.stages_advanced > 0
    dirty: set[str] = set()
    for segment in await load_segments(session):
        if not _needs_refresh(segment, full, names, profile_changed, dirty):
            continue
        entered, exited = await refresh_segment(session, segment, now, contact_ids)
        if full:
            await (await session.connection()).execute(
                sa.update(_SEGMENTS).where(_SEGMENTS.c.id == segment.id).values(refreshed_at=now)
            )
        if entered or exited:
            dirty.add(segment.key)
        changes.segments_entered += len(entered)
        changes.segments_exited += len(exited)
        derived += [(c, SEGMENT_ENTERED, {"segment": segment.key}) for c in entered]
        derived += [(c, SEGMENT_EXITED, {"segment": segment.key}) for c in exited]
        changes.changed_contacts |= set(entered) | set(exited)
    if full:
        await (await session.connection()).execute(_RECORD_SIZES, {"now": now})
    changes.derived_events = await _store_derived(session, derived, now)
    return changes


# Each full refresh records every segment's size: the dashboard draws size over time.
_RECORD_SIZES = sa.text(
    """
    INSERT INTO segment_sizes (segment_id, measured_at, size)
    SELECT s.id, :now, (SELECT count(*) FROM segment_members m WHERE m.segment_id = s.id)
    FROM segments s
    """
)
