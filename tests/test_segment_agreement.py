"""Segment membership computed in SQL (``refresh_segment`` over ``segment_members``) equals
the Python evaluator for every contact, segments that name other segments included."""

from __future__ import annotations

import json
import uuid
from typing import Any

import sqlalchemy as sa
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from activities.audience import CONDITION, SegmentDefinition, refresh_segment
from models.conditions import evaluate, inputs_of
from models.db import session_scope
from models.tables import Contact, Event, Segment, SegmentMember
from settings import Settings
from tests.test_condition_agreement import NOW, _conditions, _contact, _history, _unique

CONTACTS: sa.Table = Contact.__table__  # type: ignore[attr-defined]
EVENTS: sa.Table = Event.__table__  # type: ignore[attr-defined]
MEMBERS: sa.Table = SegmentMember.__table__  # type: ignore[attr-defined]


@st.composite
def _segment_conditions(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Up to four conditions; each may name the segments before it."""
    conditions: list[dict[str, Any]] = []
    for index in range(draw(st.integers(1, 4))):
        condition = draw(_conditions(2, in_event=False))
        if index and draw(st.booleans()):
            earlier = {"segment": f"#{draw(st.integers(0, index - 1))}"}
            condition = draw(
                st.sampled_from(
                    [
                        {"all": [condition, earlier]},
                        {"any": [condition, earlier]},
                        {"not": earlier},
                        earlier,
                    ]
                )
            )
        conditions.append(condition)
    return conditions


def _named(condition: Any, keys: list[str]) -> Any:
    """Replace the placeholder ``#i`` by the i-th segment's real key."""
    if isinstance(condition, dict):
        if isinstance(condition.get("segment"), str) and condition["segment"].startswith("#"):
            return {"segment": keys[int(condition["segment"][1:])]}
        return {k: _named(v, keys) for k, v in condition.items()}
    if isinstance(condition, list):
        return [_named(v, keys) for v in condition]
    return condition


def _finite(value: Any) -> bool:
    try:
        json.dumps(value, allow_nan=False)
    except ValueError:
        return False
    return True


@settings(
    max_examples=60,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(
    people=st.lists(st.tuples(_contact(), _history()), min_size=1, max_size=6),
    drawn=_segment_conditions(),
)
async def test_segment_membership_in_sql_agrees_with_python(
    settings: Settings, people: list[tuple[dict[str, Any], list[dict[str, Any]]]], drawn: Any
) -> None:
    # Stored conditions are JSON, which has no NaN or Infinity (the API refuses them).
    assume(_finite(drawn))
    contacts = [dict(contact) for contact, _ in people]
    histories = [history for _, history in people]
    _unique(contacts, "email")
    _unique(contacts, "external_id")
    prefix = uuid.uuid4().hex[:8]
    keys = [f"p{prefix}-{i}" for i in range(len(drawn))]
    conditions = [CONDITION.validate_python(_named(c, keys)) for c in drawn]
    ids = [uuid.uuid4() for _ in contacts]
    async with session_scope(settings.database_url) as session:
        connection = await session.connection()
        await connection.execute(
            sa.insert(CONTACTS),
            [
                {**c, "id": i, "email_status": "subscribed", "sms_status": "subscribed",
                 "created_at": NOW, "updated_at": NOW}
                for i, c in zip(ids, contacts, strict=True)
            ],
        )  # fmt: skip
        events = [
            {**e, "id": uuid.uuid4(), "idempotency_id": uuid.uuid4().hex, "contact_id": i,
             "received_at": NOW, "source": "api"}
            for i, history in zip(ids, histories, strict=True)
            for e in history
        ]  # fmt: skip
        if events:
            await connection.execute(sa.insert(EVENTS), events)
        definitions = []
        for key, condition in zip(keys, conditions, strict=True):
            row = Segment(key=key, name=key, condition=condition.model_dump(by_alias=True))
            session.add(row)
            definitions.append(SegmentDefinition(row.id, key, condition, inputs_of(condition)))
        await session.flush()
        in_python: dict[uuid.UUID, list[str]] = {i: [] for i in ids}
        for definition in definitions:
            entered, exited = await refresh_segment(session, definition, NOW, ids)
            assert exited == []
            for contact_id, contact, history in zip(ids, contacts, histories, strict=True):
                seen = {**contact, "segments": in_python[contact_id]}
                if evaluate(definition.condition, seen, history=history, now=NOW):
                    in_python[contact_id].append(definition.key)
            expected = {i for i in ids if definition.key in in_python[i]}
            assert set(entered) == expected, (definition.key, definition.condition)
        stored = await connection.execute(
            sa.select(MEMBERS.c.contact_id, Segment.__table__.c.key)  # type: ignore[attr-defined]
            .join(Segment.__table__, Segment.__table__.c.id == MEMBERS.c.segment_id)  # type: ignore[attr-defined]
            .where(MEMBERS.c.contact_id.in_(ids))
        )
        in_sql: dict[uuid.UUID, set[str]] = {i: set() for i in ids}
        for contact_id, key in stored.all():
            in_sql[contact_id].add(key)
        assert in_sql == {i: set(keys) for i, keys in in_python.items()}
        await session.rollback()
