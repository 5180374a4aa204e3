"""The condition language: one definition, used by branches, ``where`` filters and goals.

This module holds the definition and the Python evaluator (one contact, one event).
The SQL compiler for segments (``models.conditions_sql``) evaluates the same definition
and must agree with it; ``tests/test_condition_agreement.py`` checks that they do.

How a value is compared (the same rule in both evaluators):

- Values are JSON. A missing attribute or property, and a JSON ``null``, is *missing*:
  it satisfies only ``not_exists``, ``ne`` and ``not_in``.
- On a list, a comparison holds when any element satisfies it (so an empty list
  satisfies nothing but ``exists``). Elements are compared one by one, not recursively.
- Values compare only within one JSON type: number with number, string with string,
  boolean with boolean. A boolean is not a number (``true`` never equals ``1``).
  Objects, nested lists, ``null`` elements and non-finite numbers equal nothing.
- Numbers compare by decimal value, as PostgreSQL's ``numeric`` does: ``1`` equals
  ``1.0``, and a float counts as the decimal it is written as in JSON (its ``repr``).
- ``eq`` / ``in`` need the same type and value; ``ne`` is "not ``eq``" and ``not_in``
  is "not ``in``", so a type mismatch makes them true.
- ``gt`` / ``gte`` / ``lt`` / ``lte`` hold on two numbers or two strings; strings order
  by code point (PostgreSQL ``COLLATE "C"``). Any other pair is false.
- ``contains`` / ``starts_with`` hold on two strings, case-sensitively.
- An ``event`` condition counts the contact's history wherever it appears, also inside
  another event condition's ``where``; ``prop`` there reads the innermost event.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from models.durations import parse_duration

Operator = Literal[
    "eq", "ne", "gt", "gte", "lt", "lte", "in", "not_in",
    "contains", "starts_with", "exists", "not_exists",
]  # fmt: skip

# Contact fields a condition can name directly; any other name is a custom attribute.
CONTACT_FIELDS = (
    "email", "phone", "external_id", "timezone", "lifecycle_stage", "score", "tags",
)  # fmt: skip

_MISSING: Any = object()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Comparison(_Strict):
    op: Operator = "eq"
    value: Any = None

    @model_validator(mode="after")
    def _value_fits_operator(self) -> _Comparison:
        if self.op in ("in", "not_in") and not isinstance(self.value, list):
            raise ValueError(f"operator {self.op!r} needs a list value")
        if self.op not in ("exists", "not_exists") and self.value is None:
            raise ValueError(f"operator {self.op!r} needs a value")
        return self


class AttrCondition(_Comparison):
    """A contact attribute compared with a value."""

    attr: str = Field(min_length=1)


class PropCondition(_Comparison):
    """A property of the event at hand compared with a value."""

    prop: str = Field(min_length=1)


class ScoreCondition(_Strict):
    score_gte: int


class EventCondition(_Strict):
    """Behaviour: the contact did ``event`` (matching ``where``) at least ``count_gte`` times,
    within the last ``within`` (a duration like ``30d``) when given."""

    event: str = Field(min_length=1, max_length=200)
    where: Condition | None = None
    count_gte: int = Field(default=1, ge=0)
    within: str | None = None

    @field_validator("within")
    @classmethod
    def _duration(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    @property
    def window(self) -> timedelta | None:
        return parse_duration(self.within) if self.within else None


class SegmentCondition(_Strict):
    """The contact is currently a member of the segment with this key."""

    segment: str = Field(pattern=r"^[a-z0-9][a-z0-9-]{0,63}$")


class AllCondition(_Strict):
    all: list[Condition] = Field(min_length=1)


class AnyCondition(_Strict):
    any: list[Condition] = Field(min_length=1)


class NotCondition(_Strict):
    not_: Condition = Field(alias="not")


_KINDS = ("all", "any", "not", "attr", "prop", "score_gte", "event", "segment")


def _condition_kind(value: Any) -> str | None:
    if isinstance(value, BaseModel):
        value = value.model_dump(by_alias=True)
    if isinstance(value, dict):
        for kind in _KINDS:
            if kind in value:
                return kind
    return None


Condition = Annotated[
    Annotated[AllCondition, Tag("all")]
    | Annotated[AnyCondition, Tag("any")]
    | Annotated[NotCondition, Tag("not")]
    | Annotated[AttrCondition, Tag("attr")]
    | Annotated[PropCondition, Tag("prop")]
    | Annotated[ScoreCondition, Tag("score_gte")]
    | Annotated[EventCondition, Tag("event")]
    | Annotated[SegmentCondition, Tag("segment")],
    Discriminator(
        _condition_kind,
        custom_error_type="unknown_condition",
        custom_error_message="a condition needs one of: " + ", ".join(_KINDS),
    ),
]

AllCondition.model_rebuild()
AnyCondition.model_rebuild()
NotCondition.model_rebuild()
EventCondition.model_rebuild()


def contact_value(contact: dict[str, Any], name: str) -> Any:
    """The value a condition sees for ``name`` on a contact (``_MISSING`` when absent)."""
    if name in CONTACT_FIELDS:
        value = contact.get(name)
    else:
        value = (contact.get("attributes") or {}).get(name, _MISSING)
    return _MISSING if value is None else value


def json_kind(value: Any) -> str | None:
    """The JSON type a value compares as (``number``, ``string``, ``boolean``), or None
    for values that compare with nothing (objects, lists, null, non-finite numbers)."""
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "number"
    if isinstance(value, float):
        return "number" if math.isfinite(value) else None
    if isinstance(value, str):
        return "string"
    return None


def json_number(value: int | float) -> Decimal:
    """A JSON number as PostgreSQL's ``numeric`` sees it: a float is the decimal it is
    written as in JSON (``repr``), not its binary value."""
    return Decimal(value) if isinstance(value, int) else Decimal(repr(value))


def _comparable(actual: Any, expected: Any) -> tuple[Any, Any] | None:
    kind = json_kind(actual)
    if kind is None or kind != json_kind(expected):
        return None
    if kind == "number":
        return json_number(actual), json_number(expected)
    return actual, expected


def _equal(actual: Any, expected: Any) -> bool:
    pair = _comparable(actual, expected)
    return pair is not None and pair[0] == pair[1]


def _compare(op: str, actual: Any, expected: Any) -> bool:
    match op:
        case "eq":
            return _equal(actual, expected)
        case "ne":
            return not _equal(actual, expected)
        case "in":
            return any(_equal(actual, item) for item in expected)
        case "not_in":
            return not any(_equal(actual, item) for item in expected)
        case "gt" | "gte" | "lt" | "lte":
            pair = _comparable(actual, expected)
            if pair is None or isinstance(actual, bool):
                return False
            left, right = pair
            match op:
                case "gt":
                    return bool(left > right)
                case "gte":
                    return bool(left >= right)
                case "lt":
                    return bool(left < right)
                case _:
                    return bool(left <= right)
        case "contains":
            return isinstance(actual, str) and isinstance(expected, str) and expected in actual
        case "starts_with":
            return (
                isinstance(actual, str)
                and isinstance(expected, str)
                and actual.startswith(expected)
            )
    raise ValueError(f"unknown operator {op!r}")


def _holds(op: str, actual: Any, expected: Any) -> bool:
    if op == "exists":
        return actual is not _MISSING
    if op == "not_exists":
        return actual is _MISSING
    if actual is _MISSING:
        return op in ("ne", "not_in")
    if isinstance(actual, list):
        # On a list, a comparison holds when any element satisfies it.
        return any(_compare(op, item, expected) for item in actual)
    return _compare(op, actual, expected)


def evaluate(
    condition: Condition,
    contact: dict[str, Any],
    event: dict[str, Any] | None = None,
    *,
    history: list[dict[str, Any]] | None = None,
    now: datetime | None = None,
) -> bool:
    """Evaluate a condition for one contact.

    ``event`` is the event at hand (``prop`` conditions read its ``properties``);
    ``history`` is the contact's events (dicts with ``name``, ``properties`` and an aware
    ``occurred_at``) and ``now`` the moment ``within`` counts back from, for ``event``
    conditions.
    """

    def again(c: Condition) -> bool:
        return evaluate(c, contact, event, history=history, now=now)

    match condition:
        case AllCondition():
            return all(again(c) for c in condition.all)
        case AnyCondition():
            return any(again(c) for c in condition.any)
        case NotCondition():
            return not again(condition.not_)
        case AttrCondition():
            return _holds(condition.op, contact_value(contact, condition.attr), condition.value)
        case PropCondition():
            properties = (event or {}).get("properties") or {}
            actual = properties.get(condition.prop, _MISSING)
            return _holds(condition.op, _MISSING if actual is None else actual, condition.value)
        case ScoreCondition():
            return int(contact.get("score") or 0) >= condition.score_gte
        case SegmentCondition():
            return condition.segment in (contact.get("segments") or [])
        case EventCondition():
            since = now - condition.window if now is not None and condition.window else None
            count = sum(
                1
                for past in history or []
                if past["name"] == condition.event
                and (since is None or past["occurred_at"] >= since)
                and (
                    condition.where is None
                    or evaluate(condition.where, contact, past, history=history, now=now)
                )
            )
            return count >= condition.count_gte
    raise TypeError(f"not a condition: {condition!r}")


@dataclass(frozen=True)
class Inputs:
    """What a condition reads: which events, whether the profile, which segments."""

    events: frozenset[str] = frozenset()
    profile: bool = False  # attributes, contact fields or the score
    segments: frozenset[str] = frozenset()
    event_property: bool = False  # ``prop`` outside an event condition: the event at hand

    def __or__(self, other: Inputs) -> Inputs:
        return Inputs(
            self.events | other.events,
            self.profile or other.profile,
            self.segments | other.segments,
            self.event_property or other.event_property,
        )


def inputs_of(condition: Condition, *, in_event: bool = False) -> Inputs:
    """Everything ``condition`` depends on, so a refresh can skip what cannot change."""
    match condition:
        case AllCondition() | AnyCondition():
            parts = condition.all if isinstance(condition, AllCondition) else condition.any
            result = Inputs()
            for part in parts:
                result |= inputs_of(part, in_event=in_event)
            return result
        case NotCondition():
            return inputs_of(condition.not_, in_event=in_event)
        case AttrCondition() | ScoreCondition():
            return Inputs(profile=True)
        case PropCondition():
            return Inputs(event_property=not in_event)
        case SegmentCondition():
            return Inputs(segments=frozenset({condition.segment}))
        case EventCondition():
            inner = inputs_of(condition.where, in_event=True) if condition.where else Inputs()
            return inner | Inputs(events=frozenset({condition.event}))
    raise TypeError(f"not a condition: {condition!r}")
