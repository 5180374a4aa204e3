"""The condition language compiled to SQL: one WHERE clause over ``contacts``, for segments.

``select(Contact.id).where(compile_condition(condition, now=now))`` lists exactly the
contacts for which :func:`models.conditions.evaluate` is true (given each contact's events
as its history and the same ``now``); ``tests/test_condition_agreement.py`` checks it.
The comparison rule is the one in :mod:`models.conditions`' docstring.

PostgreSQL only. Every value from the condition is a bound parameter. Every expression
made here is TRUE or FALSE, never NULL, so ``not`` can negate it safely.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.sql.elements import ColumnElement

from models.conditions import (
    AllCondition,
    AnyCondition,
    AttrCondition,
    Condition,
    EventCondition,
    NotCondition,
    PropCondition,
    ScoreCondition,
    SegmentCondition,
    json_kind,
    json_number,
)
from models.tables import Contact, Event, Segment, SegmentMember

_CONTACTS: sa.Table = Contact.__table__  # type: ignore[attr-defined]
_EVENTS: sa.Table = Event.__table__  # type: ignore[attr-defined]
_SEGMENTS: sa.Table = Segment.__table__  # type: ignore[attr-defined]
_MEMBERS: sa.Table = SegmentMember.__table__  # type: ignore[attr-defined]
_STRING_FIELDS = ("email", "phone", "external_id", "timezone", "lifecycle_stage")
_ORDER = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}
# The largest LIMIT PostgreSQL takes; no contact has that many events.
_MAX_LIMIT = 2**63 - 1

# ``value #>> '{}'``: a JSON string's text, unquoted.
_ROOT: ColumnElement[Any] = sa.literal_column("'{}'::text[]")

Predicate = ColumnElement[bool]


def compile_condition(condition: Condition, *, now: datetime) -> Predicate:
    """A WHERE clause over ``contacts`` that holds where ``evaluate`` would say True.

    ``now`` is the moment ``within`` counts back from; it must be timezone-aware. Outside
    an event condition there is no event at hand, so ``prop`` sees a missing property.
    """
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError("now must be a timezone-aware datetime")
    return _compile(condition, None, now)


def compile_on_event(condition: Condition, properties: Any, *, now: datetime) -> Predicate:
    """Like :func:`compile_condition`, with ``properties`` (an events row's JSONB column)
    as the event at hand, as in an event condition's ``where``."""
    return _compile(condition, properties, now)


def _compile(condition: Condition, properties: Any, now: datetime) -> Predicate:
    """``properties`` is the JSONB column of the event at hand, or None outside one."""
    match condition:
        case AllCondition():
            return sa.and_(*(_compile(c, properties, now) for c in condition.all))
        case AnyCondition():
            return sa.or_(*(_compile(c, properties, now) for c in condition.any))
        case NotCondition():
            return sa.not_(_compile(condition.not_, properties, now))
        case AttrCondition():
            return _attribute(condition.attr, condition.op, condition.value)
        case PropCondition():
            if properties is None:
                return _on_missing(condition.op)
            return _json_holds(properties[condition.prop], condition.op, condition.value)
        case ScoreCondition():
            return sa.func.coalesce(_CONTACTS.c.score, 0) >= _number(condition.score_gte)
        case EventCondition():
            return _event(condition, now)
        case SegmentCondition():
            return _member_of(condition.segment)
    raise TypeError(f"not a condition: {condition!r}")


def _on_missing(op: str) -> Predicate:
    return sa.true() if op in ("ne", "not_in", "not_exists") else sa.false()


def _present_or_missing(missing: Predicate, op: str, present: Callable[[], Predicate]) -> Predicate:
    """``op`` on a value that may be missing (where ``missing`` holds), else ``present()``."""
    if op == "exists":
        return sa.not_(missing)
    if op == "not_exists":
        return missing
    if op in ("ne", "not_in"):
        return sa.or_(missing, present())
    return sa.and_(sa.not_(missing), present())


def _attribute(name: str, op: str, value: Any) -> Predicate:
    if name in _STRING_FIELDS or name == "score":
        column = _CONTACTS.c[name]
        typed = _Typed(number=column) if name == "score" else _Typed(string=column)
        return _present_or_missing(column.is_(None), op, lambda: _compare(typed, op, value))
    if name == "tags":
        column = _CONTACTS.c.tags
        tags = sa.func.unnest(column).table_valued("tag").render_derived()
        return _present_or_missing(
            column.is_(None),
            op,
            lambda: sa.exists(
                sa.select(sa.literal(1))
                .select_from(tags)
                .where(_compare(_Typed(string=tags.c.tag), op, value))
            ),
        )
    # Not ne / not_in: on a list they hold when *any* element differs, not "not eq".
    if op in ("eq", "in"):
        wanted = value if op == "in" else [value]
        if all(json_kind(v) is not None for v in wanted):
            return _contains_any(name, wanted)
    return _json_holds(_CONTACTS.c.attributes[name], op, value)


def _contains_any(name: str, values: list[Any]) -> Predicate:
    """Attribute ``name`` equals one of ``values``, or is a list holding one, by JSONB
    containment: the same rule as the typed comparison (JSONB compares numbers by value and
    keeps types apart), and it can use the GIN index on ``attributes``."""
    options: list[Predicate] = [sa.false()]
    for value in values:
        for shape in ({name: value}, {name: [value]}):
            document = sa.cast(sa.bindparam(None, json.dumps(shape), type_=sa.Text), JSONB)
            options.append(_CONTACTS.c.attributes.op("@>", return_type=sa.Boolean)(document))
    return sa.or_(*options)


def _json_holds(value_json: Any, op: str, value: Any) -> Predicate:
    """``op`` on a JSONB value that may be absent (SQL NULL), JSON null, a list or a scalar."""
    kind = sa.func.coalesce(sa.func.jsonb_typeof(value_json), "null")
    if op in ("exists", "not_exists"):
        return _present_or_missing(kind == "null", op, sa.true)
    element = sa.func.jsonb_array_elements(value_json).table_valued("value")
    any_element = sa.exists(
        sa.select(sa.literal(1))
        .select_from(element)
        .where(_compare(_Typed.of_json(element.c.value), op, value))
    )
    return sa.case(
        (kind == "null", _on_missing(op)),
        (kind == "array", any_element),
        else_=_compare(_Typed.of_json(value_json), op, value),
    )


@dataclass(frozen=True)
class _Typed:
    """A present, non-list value seen as each JSON type: NULL where it is not of that type,
    None where it can never be."""

    number: Any = None
    string: Any = None
    boolean: Any = None

    @classmethod
    def of_json(cls, value_json: Any) -> _Typed:
        kind = sa.func.jsonb_typeof(value_json)
        # CASE guards the casts: casting a JSON string to numeric would raise.
        return cls(
            number=sa.case((kind == "number", sa.cast(value_json, sa.Numeric))),
            string=sa.case((kind == "string", value_json.op("#>>", return_type=sa.Text)(_ROOT))),
            boolean=sa.case((kind == "boolean", sa.cast(value_json, sa.Boolean))),
        )


def _is_true(expression: Any) -> Predicate:
    """NULL (the value is not of the compared type) counts as false."""
    result: Predicate = expression.is_(sa.true())
    return result


def _compare(typed: _Typed, op: str, value: Any) -> Predicate:
    """``op`` between a present, non-list value and the condition's value; never NULL."""
    match op:
        case "eq":
            return _equal(typed, value)
        case "ne":
            return sa.not_(_equal(typed, value))
        case "in":
            return _one_of(typed, value)
        case "not_in":
            return sa.not_(_one_of(typed, value))
        case "gt" | "gte" | "lt" | "lte":
            kind = json_kind(value)
            if kind == "number" and typed.number is not None:
                return _is_true(_ORDER[op](typed.number, _number(value)))
            if kind == "string" and typed.string is not None:
                left = sa.collate(typed.string, "C")
                return _is_true(_ORDER[op](left, _string(value)))
            return sa.false()
        case "contains":
            if isinstance(value, str) and typed.string is not None:
                return _is_true(sa.func.strpos(typed.string, _string(value)) > 0)
            return sa.false()
        case "starts_with":
            if isinstance(value, str) and typed.string is not None:
                return _is_true(sa.func.starts_with(typed.string, _string(value)))
            return sa.false()
    raise ValueError(f"unknown operator {op!r}")


def _equal(typed: _Typed, value: Any) -> Predicate:
    match json_kind(value):
        case "number" if typed.number is not None:
            return _is_true(typed.number == _number(value))
        case "string" if typed.string is not None:
            return _is_true(sa.collate(typed.string, "C") == _string(value))
        case "boolean" if typed.boolean is not None:
            return _is_true(typed.boolean == sa.bindparam(None, value, type_=sa.Boolean))
    return sa.false()


def _one_of(typed: _Typed, values: list[Any]) -> Predicate:
    numbers = sorted({json_number(v) for v in values if json_kind(v) == "number"})
    strings = sorted({v for v in values if json_kind(v) == "string"})
    booleans = sorted({v for v in values if json_kind(v) == "boolean"})
    options: list[Predicate] = []
    if numbers and typed.number is not None:
        numbers_param = sa.bindparam(None, numbers, type_=ARRAY(sa.Numeric))
        options.append(_is_true(typed.number == sa.any_(numbers_param)))
    if strings and typed.string is not None:
        strings_param = sa.bindparam(None, strings, type_=ARRAY(sa.Text))
        options.append(_is_true(sa.collate(typed.string, "C") == sa.any_(strings_param)))
    options.extend(_equal(typed, b) for b in booleans)
    return sa.or_(sa.false(), *options)


def _number(value: int | float) -> Any:
    return sa.bindparam(None, json_number(value), type_=sa.Numeric)


def _string(value: str) -> Any:
    return sa.bindparam(None, value, type_=sa.Text)


def _event(condition: EventCondition, now: datetime) -> Predicate:
    """The contact has at least ``count_gte`` matching events: a correlated subquery."""
    if condition.count_gte <= 0:
        return sa.true()
    events = _EVENTS.alias()
    matching: list[Predicate] = [
        events.c.contact_id == _CONTACTS.c.id,
        events.c.name == sa.bindparam(None, condition.event, type_=sa.Text),
    ]
    if condition.window is not None:
        since = now - condition.window
        matching.append(
            events.c.occurred_at >= sa.bindparam(None, since, type_=sa.DateTime(timezone=True))
        )
    if condition.where is not None:
        matching.append(_compile(condition.where, events.c.properties, now))
    found = sa.select(sa.literal(1)).select_from(events).where(*matching).correlate(_CONTACTS)
    if condition.count_gte == 1:
        return sa.exists(found)
    # Count no further than needed.
    limit = sa.bindparam(None, min(condition.count_gte, _MAX_LIMIT), type_=sa.BigInteger)
    enough = found.limit(limit).subquery()
    counted = sa.select(sa.func.count()).select_from(enough).scalar_subquery()
    return counted >= sa.bindparam(None, Decimal(condition.count_gte), type_=sa.Numeric)


def _member_of(key: str) -> Predicate:
    """The contact is a current member of segment ``key`` (as ``segment_members`` says)."""
    members = _MEMBERS.alias()
    segments = _SEGMENTS.alias()
    return sa.exists(
        sa.select(sa.literal(1))
        .select_from(members.join(segments, segments.c.id == members.c.segment_id))
        .where(
            segments.c.key == sa.bindparam(None, key, type_=sa.Text),
            members.c.contact_id == _CONTACTS.c.id,
        )
        .correlate(_CONTACTS)
    )
