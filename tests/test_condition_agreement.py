"""One condition language, two evaluators: Python (one contact) and SQL (a whole segment).

The property test draws random contacts, event histories and conditions, and checks that
``compile_condition`` selects exactly the contacts ``evaluate`` says True for, on PostgreSQL.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection, Engine

from models.conditions import (
    CONTACT_FIELDS,
    AllCondition,
    AnyCondition,
    Condition,
    EventCondition,
    NotCondition,
    evaluate,
)
from models.conditions_sql import compile_condition
from models.tables import Contact, Event
from settings import to_sqlalchemy_url

CONDITION: TypeAdapter[Any] = TypeAdapter(Condition)
NOW = datetime(2025, 3, 14, 12, 0, tzinfo=UTC)
CONTACTS: sa.Table = Contact.__table__  # type: ignore[attr-defined]
EVENTS: sa.Table = Event.__table__  # type: ignore[attr-defined]

OPERATORS = (
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in",
    "contains", "starts_with", "exists", "not_exists",
)  # fmt: skip
EVENT_NAMES = ("signup", "purchase", "visit")
WINDOWS = ("1h", "1d", "7d", "30d")
# Offsets from NOW, in seconds, including the edges of every window and the future.
OFFSETS = (0, 1, -1, -3600, 3599, 3600, 3601, 86399, 86400, 86401, 604800, 2592000, 2592001)

# Small pools, so that values drawn for data and for conditions often collide.
STRINGS = ("", "a", "ab", "B", "pro", "é", "z", "😀", "a😀", "1", "true")
INTEGERS = (0, 1, -1, 2, 12, 2**31 - 1, 2**53 + 1, 10**23)
FLOATS = (0.0, -0.0, 1.0, 1.5, 0.1, 12.0, 1e23, 2.0**53)
# Numbers that are equal, or nearly, across int and float (1e23 is 10**23 in JSON).
NUMBERS = (0, -0.0, 1, 1.0, 12, 12.0, 1.5, 10**23, 1e23, 10**23 - 1, 2**53 + 1, 2.0**53)
# Characters whose code-point order differs from a locale's; no NUL (PostgreSQL refuses it).
ALPHABET = "aAbBzZ1 -/é€😀"


def _strings() -> st.SearchStrategy[str]:
    return st.sampled_from(STRINGS) | st.text(ALPHABET, max_size=3)


def _numbers() -> st.SearchStrategy[int | float]:
    return (
        st.sampled_from(INTEGERS)
        | st.integers(-20, 20)
        | st.sampled_from(FLOATS)
        | st.floats(allow_nan=False, allow_infinity=False)
    )


def _scalars() -> st.SearchStrategy[Any]:
    return _strings() | _numbers() | st.booleans()


def _anything() -> st.SearchStrategy[Any]:
    """Any JSON value an attribute or property can hold; None is stored as JSON null."""
    odd = st.none() | st.lists(_strings(), max_size=2) | st.dictionaries(_strings(), _scalars())
    return (
        _scalars()
        | st.none()
        | st.lists(_scalars() | odd, max_size=3)
        | st.dictionaries(st.sampled_from(STRINGS), _scalars(), max_size=2)
    )


def _mostly(
    typical: st.SearchStrategy[Any], other: st.SearchStrategy[Any]
) -> st.SearchStrategy[Any]:
    """``typical`` three times in four, else ``other``."""
    return st.sampled_from((True, True, True, False)).flatmap(
        lambda usual: typical if usual else other
    )


# The values typical of each name (an element's, for list-valued names). Data and
# conditions draw mostly from these, so comparisons usually meet a value of their type.
TYPICAL: dict[str, st.SearchStrategy[Any]] = {
    "email": st.sampled_from(("ada@example.com", "Ada@example.com", "ada@", "")),
    "phone": st.sampled_from(("+15550001", "+4479", "")),
    "external_id": _strings(),
    "timezone": st.sampled_from(("UTC", "Europe/Paris", "")),
    "lifecycle_stage": st.sampled_from(("subscriber", "lead", "customer", "", "B")),
    "score": st.integers(-5, 60) | st.sampled_from((1.5, 40.0, 2**31 - 1, -(2**31))),
    "tags": st.sampled_from(("trial", "vip", "Vip", "webinar")) | _strings(),
    "plan": st.sampled_from(("free", "pro", "Pro", "pro+", "é", "")),
    "seats": _mostly(st.sampled_from(NUMBERS), _numbers()),
    "vip": st.booleans() | st.sampled_from((0, 1, "true")),
    "teams": st.sampled_from(("growth", "brand", "Growth", "gro")) | st.integers(0, 2),
    "page": st.sampled_from(("/pricing", "/Pricing", "/blog", "/", "")),
    "amount": _mostly(st.sampled_from(NUMBERS), _numbers()),
    "items": st.sampled_from(("sku-1", "sku-2", "sku")) | st.integers(1, 3),
    "unknown": _scalars(),
}
ATTRIBUTE_NAMES = ("plan", "seats", "vip", "teams")
PROPERTY_NAMES = ("page", "amount", "plan", "items")
LIST_NAMES = ("teams", "items")


def _data(name: str) -> st.SearchStrategy[Any]:
    typical = TYPICAL[name]
    if name in LIST_NAMES:
        typical = st.lists(typical, max_size=3)
    return _mostly(typical, _anything())


def _condition_value(name: str, op: str) -> st.SearchStrategy[Any]:
    if op in ("exists", "not_exists"):
        return st.none()
    odd = (
        _scalars()
        | st.sampled_from([math.nan, math.inf, -math.inf])
        | st.lists(_scalars(), max_size=2)
        | st.dictionaries(st.sampled_from(STRINGS), _scalars(), max_size=1)
    )
    value = _mostly(TYPICAL[name], odd)
    if op in ("in", "not_in"):
        return st.lists(value, max_size=4)
    return value


@st.composite
def _comparison(draw: st.DrawFn, key: str, names: tuple[str, ...]) -> dict[str, Any]:
    name = draw(st.sampled_from(names))
    op = draw(st.sampled_from(OPERATORS))
    condition = {key: name, "op": op}
    value = draw(_condition_value(name, op))
    if value is not None:
        condition["value"] = value
    return condition


def _conditions(depth: int, in_event: bool) -> st.SearchStrategy[dict[str, Any]]:
    """Condition documents nested up to ``depth`` levels of all/any/not/event."""
    attributes = _comparison("attr", (*CONTACT_FIELDS, *ATTRIBUTE_NAMES * 2, "unknown"))
    properties = _comparison("prop", (*PROPERTY_NAMES, "unknown"))
    scores = st.builds(lambda n: {"score_gte": n}, st.integers(-5, 60))
    leaves = attributes | attributes | properties | scores | _events(-1)
    if in_event:
        leaves = properties | leaves
    if depth <= 0:
        return leaves
    inner = _conditions(depth - 1, in_event)
    return st.one_of(
        leaves,
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"all": cs}),
        st.lists(inner, min_size=1, max_size=3).map(lambda cs: {"any": cs}),
        inner.map(lambda c: {"not": c}),
        _events(depth - 1),
    )


def _events(depth: int) -> st.SearchStrategy[dict[str, Any]]:
    """Event conditions; a ``where`` nested ``depth`` deep (none when negative)."""

    def build(name: str, where: Any, count: int, within: str | None) -> dict[str, Any]:
        condition: dict[str, Any] = {"event": name, "count_gte": count}
        if where is not None:
            condition["where"] = where
        if within is not None:
            condition["within"] = within
        return condition

    return st.builds(
        build,
        st.sampled_from(EVENT_NAMES),
        st.none() if depth < 0 else st.none() | _conditions(depth, in_event=True),
        st.sampled_from((0, 1, 1, 2, 3)),
        st.none() | st.sampled_from(WINDOWS),
    )


CONDITIONS = _conditions(3, in_event=False).map(CONDITION.validate_python)
# Single comparisons and shallow event conditions: many of them per example, checked at
# little cost, make it likely that every operator meets every type.
LEAVES = st.one_of(
    _comparison("attr", (*CONTACT_FIELDS, *ATTRIBUTE_NAMES * 2, "unknown")),
    _comparison("attr", ATTRIBUTE_NAMES),
    _events(0),
).map(CONDITION.validate_python)


def _history() -> st.SearchStrategy[list[dict[str, Any]]]:
    event = st.fixed_dictionaries(
        {
            "name": st.sampled_from(EVENT_NAMES),
            "properties": st.fixed_dictionaries(
                {}, optional={name: _data(name) for name in PROPERTY_NAMES}
            ),
            "occurred_at": _mostly(st.sampled_from(OFFSETS), st.integers(-86400, 40 * 86400)).map(
                lambda seconds: NOW - timedelta(seconds=seconds)
            ),
        }
    )
    return st.lists(event, max_size=5)


def _contact() -> st.SearchStrategy[dict[str, Any]]:
    def optional(name: str) -> st.SearchStrategy[Any]:
        return _mostly(TYPICAL[name], st.none())

    return st.fixed_dictionaries(
        {
            "email": optional("email"),
            "phone": optional("phone"),
            "external_id": optional("external_id"),
            "timezone": optional("timezone"),
            "lifecycle_stage": TYPICAL["lifecycle_stage"],
            "score": st.integers(-5, 60) | st.sampled_from((0, 2**31 - 1, -(2**31))),
            "tags": st.lists(TYPICAL["tags"], max_size=3),
            "attributes": st.fixed_dictionaries(
                {}, optional={name: _data(name) for name in ATTRIBUTE_NAMES}
            ),
        }
    )


def _unique(contacts: list[dict[str, Any]], field: str) -> None:
    """Clear repeats of a field the table keeps unique."""
    seen = set()
    for contact in contacts:
        if contact[field] in seen:
            contact[field] = None
        elif contact[field] is not None:
            seen.add(contact[field])


def _insert(
    connection: Connection, contacts: list[dict[str, Any]], histories: list[list[dict[str, Any]]]
) -> list[uuid.UUID]:
    ids = [uuid.uuid4() for _ in contacts]
    connection.execute(
        sa.insert(CONTACTS),
        [
            {
                **contact,
                "id": contact_id,
                "email_status": "subscribed",
                "sms_status": "subscribed",
                "created_at": NOW,
                "updated_at": NOW,
            }
            for contact_id, contact in zip(ids, contacts, strict=True)
        ],
    )
    events = [
        {
            **event,
            "id": uuid.uuid4(),
            "idempotency_id": uuid.uuid4().hex,
            "contact_id": contact_id,
            "received_at": NOW,
            "source": "api",
        }
        for contact_id, history in zip(ids, histories, strict=True)
        for event in history
    ]
    if events:
        connection.execute(sa.insert(EVENTS), events)
    return ids


def _selected(connection: Connection, condition: Condition, ids: list[uuid.UUID]) -> set[uuid.UUID]:
    query = sa.select(CONTACTS.c.id).where(
        CONTACTS.c.id.in_(ids), compile_condition(condition, now=NOW)
    )
    return set(connection.scalars(query))


def _parts(condition: Condition) -> Iterator[Condition]:
    """A condition and every condition inside it."""
    yield condition
    match condition:
        case AllCondition():
            for inner in condition.all:
                yield from _parts(inner)
        case AnyCondition():
            for inner in condition.any:
                yield from _parts(inner)
        case NotCondition():
            yield from _parts(condition.not_)
        case EventCondition() if condition.where is not None:
            yield from _parts(condition.where)


@pytest.fixture(scope="module")
def engine(database_url: str) -> Iterator[Engine]:
    engine = sa.create_engine(to_sqlalchemy_url(database_url))
    yield engine
    engine.dispose()


@pytest.fixture
def connection(engine: Engine) -> Iterator[Connection]:
    """A connection whose writes are rolled back after the test."""
    with engine.connect() as connection:
        transaction = connection.begin()
        yield connection
        transaction.rollback()


@settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    people=st.lists(st.tuples(_contact(), _history()), min_size=1, max_size=6),
    conditions=st.lists(CONDITIONS, min_size=1, max_size=6),
    leaves=st.lists(LEAVES, min_size=10, max_size=40),
)
def test_condition_sql_agrees_with_python(
    engine: Engine,
    people: list[tuple[dict[str, Any], list[dict[str, Any]]]],
    conditions: list[Any],
    leaves: list[Any],
) -> None:
    contacts = [dict(contact) for contact, _ in people]
    histories = [history for _, history in people]
    _unique(contacts, "email")
    _unique(contacts, "external_id")
    with engine.connect() as connection:
        transaction = connection.begin()
        try:
            ids = _insert(connection, contacts, histories)
            for condition in conditions:
                expected = {
                    contact_id
                    for contact_id, contact, history in zip(ids, contacts, histories, strict=True)
                    if evaluate(condition, contact, history=history, now=NOW)
                }
                assert _selected(connection, condition, ids) == expected, condition
            # Every part on its own too, so that all/any cannot hide a disagreement; as
            # columns, which also shows that no compiled expression is ever NULL.
            parts = [part for condition in conditions + leaves for part in _parts(condition)]
            query = sa.select(
                CONTACTS.c.id, *(compile_condition(part, now=NOW) for part in parts)
            ).where(CONTACTS.c.id.in_(ids))
            rows = {row[0]: row[1:] for row in connection.execute(query)}
            for contact_id, contact, history in zip(ids, contacts, histories, strict=True):
                for part, in_sql in zip(parts, rows[contact_id], strict=True):
                    in_python = evaluate(part, contact, history=history, now=NOW)
                    assert in_sql is in_python, (part, contact, history)
        finally:
            transaction.rollback()


CONTACT = {
    "email": "ada@example.com",
    "phone": None,
    "external_id": None,
    "timezone": None,
    "lifecycle_stage": "lead",
    "score": 40,
    "tags": ["trial", "webinar"],
    "attributes": {
        "role": "CMO",
        "seats": 12,
        "ratio": 1.0,
        "vip": True,
        "plan": None,
        "teams": ["growth", "brand"],
        "codes": [3, "3"],
        "empty": [],
        "city": "Zürich",
        "big": 1e23,
    },
}
HISTORY = [
    {"name": "purchase", "properties": {"amount": 30}, "occurred_at": NOW - timedelta(hours=1)},
    {"name": "purchase", "properties": {"amount": 5}, "occurred_at": NOW - timedelta(days=2)},
    {"name": "purchase", "properties": {"amount": 80}, "occurred_at": NOW - timedelta(days=3)},
    {"name": "visit", "properties": {"page": "/pricing"}, "occurred_at": NOW - timedelta(days=9)},
]


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        # A list attribute: the comparison holds when any element satisfies it.
        ({"attr": "teams", "op": "eq", "value": "brand"}, True),
        ({"attr": "teams", "op": "ne", "value": "growth"}, True),
        ({"attr": "teams", "op": "not_in", "value": ["growth", "brand"]}, False),
        ({"attr": "teams", "op": "eq", "value": ["growth", "brand"]}, False),
        ({"attr": "tags", "op": "starts_with", "value": "web"}, True),
        ({"attr": "codes", "op": "gt", "value": 2}, True),
        ({"attr": "codes", "op": "gt", "value": "2"}, True),
        ({"attr": "empty", "op": "exists"}, True),
        ({"attr": "empty", "op": "ne", "value": "x"}, False),
        # Missing and JSON null alike satisfy only not_exists, ne and not_in.
        ({"attr": "plan", "op": "exists"}, False),
        ({"attr": "plan", "op": "not_exists"}, True),
        ({"attr": "plan", "op": "ne", "value": "pro"}, True),
        ({"attr": "plan", "op": "not_in", "value": ["pro"]}, True),
        ({"attr": "plan", "op": "lt", "value": 3}, False),
        ({"attr": "company", "op": "eq", "value": "Acme"}, False),
        ({"attr": "phone", "op": "ne", "value": "+1"}, True),
        ({"not": {"attr": "company", "op": "eq", "value": "Acme"}}, True),
        ({"not": {"attr": "company", "op": "ne", "value": "Acme"}}, False),
        ({"not": {"attr": "company", "op": "gt", "value": 1}}, True),
        # A boolean is not a number; numbers compare by value.
        ({"attr": "vip", "op": "eq", "value": 1}, False),
        ({"attr": "vip", "op": "ne", "value": 1}, True),
        ({"attr": "vip", "op": "in", "value": [1, "true"]}, False),
        ({"attr": "vip", "op": "in", "value": [1, True]}, True),
        ({"attr": "vip", "op": "gt", "value": False}, False),
        ({"attr": "ratio", "op": "eq", "value": 1}, True),
        ({"attr": "seats", "op": "eq", "value": 12.0}, True),
        ({"attr": "big", "op": "eq", "value": 10**23}, True),
        ({"attr": "big", "op": "lt", "value": 10**23 + 1}, True),
        ({"attr": "seats", "op": "gt", "value": "10"}, False),
        ({"attr": "seats", "op": "ne", "value": "12"}, True),
        ({"attr": "seats", "op": "eq", "value": math.nan}, False),
        ({"attr": "score", "op": "gte", "value": 40}, True),
        ({"attr": "score", "op": "eq", "value": True}, False),
        # Strings: case-sensitive, ordered by code point.
        ({"attr": "role", "op": "gt", "value": "Cz"}, False),
        ({"attr": "role", "op": "lt", "value": "a"}, True),
        ({"attr": "city", "op": "gt", "value": "Zz"}, True),
        ({"attr": "email", "op": "contains", "value": "EXAMPLE"}, False),
        ({"attr": "city", "op": "contains", "value": ""}, True),
        # Behaviour: count_gte with within, edges included.
        ({"event": "purchase", "count_gte": 2, "within": "3d"}, True),
        ({"event": "purchase", "count_gte": 3, "within": "2d"}, False),
        ({"event": "purchase", "count_gte": 3, "within": "72h"}, True),
        ({"event": "purchase", "count_gte": 3}, True),
        ({"event": "purchase", "count_gte": 4}, False),
        ({"event": "signup", "count_gte": 0}, True),
        ({"event": "signup"}, False),
        (
            {
                "event": "purchase",
                "count_gte": 2,
                "where": {"prop": "amount", "op": "gte", "value": 30},
            },
            True,
        ),
        ({"event": "purchase", "where": {"prop": "amount", "op": "gt", "value": 80}}, False),
        ({"event": "visit", "where": {"attr": "role", "value": "CMO"}}, True),
        ({"event": "visit", "where": {"event": "purchase", "count_gte": 3}}, True),
        # Outside an event, prop sees no event: the property is missing.
        ({"prop": "amount", "op": "exists"}, False),
        ({"prop": "amount", "op": "ne", "value": 1}, True),
        ({"score_gte": 40}, True),
        ({"score_gte": 41}, False),
        # Values beyond any column type still compare exactly.
        ({"score_gte": 10**30}, False),
        ({"event": "purchase", "count_gte": 10**30}, False),
        ({"attr": "seats", "op": "lt", "value": 10**400}, True),
    ],
)
def test_condition_evaluators_agree_on_tricky_cases(
    connection: Connection, condition: dict[str, Any], expected: bool
) -> None:
    parsed = CONDITION.validate_python(condition)
    (contact_id,) = _insert(connection, [CONTACT], [HISTORY])
    assert evaluate(parsed, CONTACT, history=HISTORY, now=NOW) is expected
    assert _selected(connection, parsed, [contact_id]) == ({contact_id} if expected else set())


def test_condition_sql_binds_every_value() -> None:
    hostile = "x'); DROP TABLE contacts; --"
    condition = CONDITION.validate_python(
        {
            "all": [
                {"attr": hostile, "op": "eq", "value": hostile},
                {"attr": "tags", "op": "in", "value": [hostile]},
                {"event": hostile, "where": {"prop": hostile, "op": "contains", "value": hostile}},
            ]
        }
    )
    query = sa.select(CONTACTS.c.id).where(compile_condition(condition, now=NOW))
    assert hostile not in str(query.compile(dialect=postgresql.dialect()))


def test_condition_sql_refuses_naive_now() -> None:
    condition = CONDITION.validate_python({"event": "visit", "within": "1d"})
    with pytest.raises(ValueError, match="timezone-aware"):
        compile_condition(condition, now=datetime(2025, 1, 1))
