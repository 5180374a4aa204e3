"""Journey, message and segment metrics, computed in SQL on PostgreSQL.

Two reusable aggregates. Counts come from one scan grouped at the finest grain asked
(e.g. version x step x variant: a handful of groups), and the totals and each breakdown are
summed from those groups; the figures that do not add up (median time to convert, revenue)
come from a ``GROUPING SETS`` query over the conversions only:

- ``message_metrics(session, MessageFilter, dimensions)``: counts and rates of messages
  matching any filter (journey, version, step, variant, channel...), broken down by the
  named dimensions. Per-broadcast metrics is this function with one more filter field
  and dimension (``messages.broadcast_id``).
- ``enrollment_metrics(session, EnrollmentFilter, dimensions)``: enrolled, active,
  completed, exited, conversions (exit goal reached), median time from enrollment to
  conversion, and revenue (the ``value`` or ``revenue`` property of the goal event).

Definitions (the README repeats them): a message counts as *sent* once the provider
accepted it (``sent_at``); *delivered* once delivered, opened or clicked (an open is
proof of delivery); *opened* once opened or clicked. Rates are over sent messages, except
click-to-open (clicked / opened) and the conversion rate (conversions / enrolled).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlmodel.ext.asyncio.session import AsyncSession

MESSAGE_COUNTS = (
    "total",
    "sent",
    "delivered",
    "opened",
    "clicked",
    "bounced",
    "complained",
    "unsubscribed",
    "failed",
    "skipped",
)
# rate name -> (numerator, denominator)
MESSAGE_RATES = {
    "delivery_rate": ("delivered", "sent"),
    "open_rate": ("opened", "sent"),
    "click_rate": ("clicked", "sent"),
    "click_to_open_rate": ("clicked", "opened"),
    "bounce_rate": ("bounced", "sent"),
    "complaint_rate": ("complained", "sent"),
    "unsubscribe_rate": ("unsubscribed", "sent"),
}
ENROLLMENT_COUNTS = ("enrolled", "active", "completed", "exited", "failed", "conversions")

WORK_MEM = "64MB"
_MESSAGE_DIMENSIONS = {
    "journey": "m.journey_id",
    "version": "m.journey_version",
    "step": "m.step_id",
    "variant": "m.variant",
    "channel": "m.channel",
    "template": "m.template_key",
}
_ENROLLMENT_DIMENSIONS = {
    "journey": "en.journey_id",
    "version": "jv.version",
    "variant": "en.variant",
}

_MESSAGE_AGGREGATES = """
    count(*) AS total,
    count(*) FILTER (WHERE m.sent_at IS NOT NULL) AS sent,
    count(*) FILTER (WHERE coalesce(m.delivered_at, m.opened_at, m.clicked_at) IS NOT NULL)
        AS delivered,
    count(*) FILTER (WHERE coalesce(m.opened_at, m.clicked_at) IS NOT NULL) AS opened,
    count(*) FILTER (WHERE m.clicked_at IS NOT NULL) AS clicked,
    count(*) FILTER (WHERE m.bounced_at IS NOT NULL) AS bounced,
    count(*) FILTER (WHERE m.complained_at IS NOT NULL) AS complained,
    count(*) FILTER (WHERE m.unsubscribed_at IS NOT NULL) AS unsubscribed,
    count(*) FILTER (WHERE m.status = 'failed') AS failed,
    count(*) FILTER (WHERE m.status = 'skipped') AS skipped
"""

# The goal event: the last event named in the goal ("exit_when met by event <name>") that
# Nurture received while the enrollment ran. Its numeric value or revenue is attributed.
_GOAL_PREFIX = "exit_when met by event "
_ENROLLMENT_COUNTS = """
    count(*) AS enrolled,
    count(*) FILTER (WHERE en.status = 'active') AS active,
    count(*) FILTER (WHERE en.status = 'completed') AS completed,
    count(*) FILTER (WHERE en.status = 'exited') AS exited,
    count(*) FILTER (WHERE en.status = 'failed') AS failed,
    count(*) FILTER (WHERE en.goal IS NOT NULL) AS conversions
"""
_CONVERSION_AGGREGATES = """
    percentile_cont(0.5) WITHIN GROUP (
        ORDER BY extract(epoch FROM en.ended_at - en.started_at)
    ) FILTER (WHERE en.ended_at IS NOT NULL) AS median_conversion_seconds,
    sum(goal.value) AS revenue
"""
_GOAL_EVENT = """
    LEFT JOIN LATERAL (
        SELECT CASE
            WHEN jsonb_typeof(e.properties -> 'value') = 'number'
                THEN (e.properties ->> 'value')::numeric
            WHEN (e.properties ->> 'value') ~ '^-?[0-9]+(\\.[0-9]+)?$'
                THEN (e.properties ->> 'value')::numeric
            WHEN jsonb_typeof(e.properties -> 'revenue') = 'number'
                THEN (e.properties ->> 'revenue')::numeric
            WHEN (e.properties ->> 'revenue') ~ '^-?[0-9]+(\\.[0-9]+)?$'
                THEN (e.properties ->> 'revenue')::numeric
        END AS value
        FROM events e
        WHERE en.goal LIKE :goal_like
          AND e.contact_id = en.contact_id
          AND e.name = substr(en.goal, :goal_offset)
          AND e.received_at >= en.started_at
          AND e.received_at <= coalesce(en.ended_at, now())
        ORDER BY e.received_at DESC
        LIMIT 1
    ) goal ON true
"""


@dataclass(frozen=True)
class MessageFilter:
    """Which messages to count; every field set narrows the set."""

    journey_id: uuid.UUID | None = None
    broadcast_id: uuid.UUID | None = None
    version: int | None = None
    step_id: str | None = None
    variant: str | None = None
    channel: str | None = None
    created_from: datetime | None = None
    created_to: datetime | None = None

    def clauses(self) -> tuple[list[str], dict[str, Any]]:
        where: list[str] = []
        params: dict[str, Any] = {}
        for name, column in (
            ("journey_id", "m.journey_id"),
            ("broadcast_id", "m.broadcast_id"),
            ("version", "m.journey_version"),
            ("step_id", "m.step_id"),
            ("variant", "m.variant"),
            ("channel", "m.channel"),
        ):
            value = getattr(self, name)
            if value is not None:
                where.append(f"{column} = :f_{name}")
                params[f"f_{name}"] = value
        if self.created_from is not None:
            where.append("m.created_at >= :f_created_from")
            params["f_created_from"] = self.created_from
        if self.created_to is not None:
            where.append("m.created_at < :f_created_to")
            params["f_created_to"] = self.created_to
        return where, params


@dataclass(frozen=True)
class EnrollmentFilter:
    journey_id: uuid.UUID | None = None
    version: int | None = None
    variant: str | None = None

    def clauses(self) -> tuple[list[str], dict[str, Any]]:
        where: list[str] = []
        params: dict[str, Any] = {}
        for name, column in (
            ("journey_id", "en.journey_id"),
            ("version", "jv.version"),
            ("variant", "en.variant"),
        ):
            value = getattr(self, name)
            if value is not None:
                where.append(f"{column} = :f_{name}")
                params[f"f_{name}"] = value
        return where, params


@dataclass
class MetricsRow:
    """One line of a breakdown: the dimension values it is for (empty: the totals)."""

    key: dict[str, Any]
    counts: dict[str, Any] = field(default_factory=dict)

    def rates(self) -> dict[str, float | None]:
        return {
            name: _ratio(self.counts.get(top), self.counts.get(bottom))
            for name, (top, bottom) in MESSAGE_RATES.items()
        }


def _ratio(top: Any, bottom: Any) -> float | None:
    return round(float(top) / float(bottom), 4) if bottom else None


def _check(dimensions: Sequence[str], columns: dict[str, str]) -> None:
    unknown = [d for d in dimensions if d not in columns]
    if unknown:
        raise ValueError(f"unknown dimension(s): {', '.join(unknown)}")


def _fine_grouping(dimensions: Sequence[str], columns: dict[str, str]) -> tuple[str, str]:
    """SELECT list and GROUP BY of every dimension together: the finest grain, few groups
    (versions x steps x variants), one hash aggregate; the totals and per-dimension rows
    are sums of these (the counts are additive)."""
    _check(dimensions, columns)
    if not dimensions:
        return "", ""
    select = "".join(f"{columns[d]} AS d_{d},\n" for d in dimensions)
    return select, "GROUP BY " + ", ".join(columns[d] for d in dimensions)


def _grouping_sets(dimensions: Sequence[str], columns: dict[str, str]) -> tuple[str, str]:
    """SELECT list of the dimension columns with GROUPING() flags, and the GROUP BY clause:
    the totals plus one grouping set per dimension (for figures that do not add up)."""
    _check(dimensions, columns)
    select = [f"{columns[d]} AS d_{d}, GROUPING({columns[d]}) AS g_{d}" for d in dimensions]
    sets = ", ".join(["()"] + [f"({columns[d]})" for d in dimensions])
    return "".join(s + ",\n" for s in select), f"GROUP BY GROUPING SETS ({sets})"


def _roll_up(result: Any, dimensions: Sequence[str], counts: Sequence[str]) -> list[MetricsRow]:
    """The totals and one row per value of each dimension, summed from the fine groups."""
    rows: dict[tuple[str, Any], MetricsRow] = {("", None): MetricsRow({}, dict.fromkeys(counts, 0))}
    for fine in result.mappings():
        for dimension in ("", *dimensions):
            value = fine[f"d_{dimension}"] if dimension else None
            row = rows.get((dimension, value))
            if row is None:
                row = rows[(dimension, value)] = MetricsRow(
                    {dimension: value}, dict.fromkeys(counts, 0)
                )
            for name in counts:
                row.counts[name] += fine[name] or 0
    return list(rows.values())


async def _analytics_memory(session: AsyncSession) -> None:
    """Room for the hash aggregates of a large journey (250,000 enrollments' groups) in
    memory instead of a sorted index walk: for this transaction only."""
    await (await session.connection()).execute(sa.text(f"SET LOCAL work_mem = '{WORK_MEM}'"))


def _where(clauses: list[str]) -> str:
    return f"WHERE {' AND '.join(clauses)}" if clauses else ""


async def message_metrics(
    session: AsyncSession, where: MessageFilter, dimensions: Sequence[str] = ()
) -> list[MetricsRow]:
    """Counts of the messages matching ``where``: the totals (``key == {}``) first, then
    one row per value of each dimension."""
    select, group_by = _fine_grouping(dimensions, _MESSAGE_DIMENSIONS)
    clauses, params = where.clauses()
    await _analytics_memory(session)
    sql = f"SELECT {select}{_MESSAGE_AGGREGATES} FROM messages m {_where(clauses)} {group_by}"
    result = await (await session.connection()).execute(sa.text(sql), params)
    return _sorted(_roll_up(result, dimensions, MESSAGE_COUNTS))


async def enrollment_metrics(
    session: AsyncSession, where: EnrollmentFilter, dimensions: Sequence[str] = ()
) -> list[MetricsRow]:
    """Enrollment outcomes matching ``where``: the totals first, then per dimension value.

    Counts come from one fine-grained scan; the median time to convert and the revenue
    (which do not add up) from a GROUPING SETS query over the conversions alone."""
    select, group_by = _fine_grouping(dimensions, _ENROLLMENT_DIMENSIONS)
    clauses, params = where.clauses()
    await _analytics_memory(session)
    connection = await session.connection()
    result = await connection.execute(
        sa.text(
            f"SELECT {select}{_ENROLLMENT_COUNTS} FROM enrollments en "
            "JOIN journey_versions jv ON jv.id = en.journey_version_id "
            f"{_where(clauses)} {group_by}"
        ),
        params,
    )
    rows = _roll_up(result, dimensions, ENROLLMENT_COUNTS)
    select, group_by = _grouping_sets(dimensions, _ENROLLMENT_DIMENSIONS)
    params |= {"goal_like": _GOAL_PREFIX + "%", "goal_offset": len(_GOAL_PREFIX) + 1}
    conversions = await connection.execute(
        sa.text(
            f"SELECT {select}{_CONVERSION_AGGREGATES} FROM enrollments en "
            "JOIN journey_versions jv ON jv.id = en.journey_version_id "
            f"{_GOAL_EVENT} {_where([*clauses, 'en.goal IS NOT NULL'])} {group_by}"
        ),
        params,
    )
    outcomes: dict[tuple[tuple[str, Any], ...], Any] = {}
    for found in conversions.mappings():
        key = {d: found[f"d_{d}"] for d in dimensions if found[f"g_{d}"] == 0}
        outcomes[tuple(key.items())] = found
    for row in rows:
        row.counts["conversion_rate"] = _ratio(row.counts["conversions"], row.counts["enrolled"])
        outcome = outcomes.get(tuple(row.key.items()))
        median = outcome["median_conversion_seconds"] if outcome else None
        revenue = outcome["revenue"] if outcome else None
        row.counts["median_conversion_seconds"] = None if median is None else float(median)
        row.counts["revenue"] = None if revenue is None else float(revenue)
    return _sorted(rows)


def _sorted(rows: list[MetricsRow]) -> list[MetricsRow]:
    """Totals first, then by dimension name and value (NULLs last)."""
    return sorted(
        rows,
        key=lambda r: (
            len(r.key),
            sorted(r.key),
            [(v is None, str(v)) for _, v in sorted(r.key.items())],
        ),
    )


def totals(rows: Sequence[MetricsRow]) -> MetricsRow:
    return next(r for r in rows if not r.key)


def breakdown(rows: Sequence[MetricsRow], dimension: str) -> list[MetricsRow]:
    return [r for r in rows if list(r.key) == [dimension]]


async def segment_sizes(
    session: AsyncSession, segment_id: uuid.UUID, since: datetime | None = None, limit: int = 500
) -> list[tuple[datetime, int]]:
    """The segment's recorded sizes (oldest first), the latest ``limit`` since ``since``."""
    result = await (await session.connection()).execute(
        sa.text(
            """
            SELECT measured_at, size FROM (
                SELECT measured_at, size FROM segment_sizes
                WHERE segment_id = :segment AND (CAST(:since AS timestamptz) IS NULL
                                                 OR measured_at >= :since)
                ORDER BY measured_at DESC LIMIT :limit
            ) latest ORDER BY measured_at
            """
        ),
        {"segment": segment_id, "since": since, "limit": limit},
    )
    return [(row[0], row[1]) for row in result.all()]


def message_summary(row: MetricsRow | None) -> dict[str, Any]:
    """Counts and rates of one message row (zeros when there is none)."""
    if row is None:
        row = MetricsRow(key={}, counts=dict.fromkeys(MESSAGE_COUNTS, 0))
    return {**row.counts, **row.rates()}


def enrollment_summary(row: MetricsRow | None) -> dict[str, Any]:
    if row is None:
        return {
            **dict.fromkeys(ENROLLMENT_COUNTS, 0),
            "conversion_rate": None,
            "median_conversion_seconds": None,
            "revenue": None,
        }
    return dict(row.counts)


async def journey_report(
    session: AsyncSession, journey_id: uuid.UUID, version: int | None = None
) -> dict[str, Any]:
    """Everything the journey's metrics endpoint and dashboard page show: totals, and per
    version, per step and per A/B variant (two scans: messages, enrollments)."""
    messages = await message_metrics(
        session,
        MessageFilter(journey_id=journey_id, version=version),
        ("version", "step", "variant"),
    )
    enrollments = await enrollment_metrics(
        session, EnrollmentFilter(journey_id=journey_id, version=version), ("version", "variant")
    )

    def find(rows: list[MetricsRow], dimension: str, value: Any) -> MetricsRow | None:
        return next((r for r in rows if r.key == {dimension: value}), None)

    versions = sorted(
        {r.key["version"] for r in breakdown(enrollments, "version")}
        | {r.key["version"] for r in breakdown(messages, "version") if r.key["version"]}
    )
    variants = sorted(
        {r.key["variant"] for r in breakdown(enrollments, "variant") if r.key["variant"]}
        | {r.key["variant"] for r in breakdown(messages, "variant") if r.key["variant"]}
    )
    return {
        "enrollments": enrollment_summary(totals(enrollments)),
        "messages": message_summary(totals(messages)),
        "by_version": [
            {
                "version": v,
                "enrollments": enrollment_summary(find(enrollments, "version", v)),
                "messages": message_summary(find(messages, "version", v)),
            }
            for v in versions
        ],
        "by_step": [
            {"step": r.key["step"], "messages": message_summary(r)}
            for r in breakdown(messages, "step")
            if r.key["step"] is not None
        ],
        "by_variant": [
            {
                "variant": v,
                "enrollments": enrollment_summary(find(enrollments, "variant", v)),
                "messages": message_summary(find(messages, "variant", v)),
            }
            for v in variants
        ],
    }


async def journey_funnel(
    session: AsyncSession, journey_id: uuid.UUID, version: int | None = None
) -> tuple[int, int, int]:
    """Enrollments that got a message, opened one, clicked one (each counted once)."""
    version_filter = "AND m.journey_version = :version" if version is not None else ""
    await _analytics_memory(session)
    result = await (await session.connection()).execute(
        sa.text(
            f"""
            SELECT count(*) FILTER (WHERE sent), count(*) FILTER (WHERE opened),
                   count(*) FILTER (WHERE clicked)
            FROM (
                SELECT bool_or(m.sent_at IS NOT NULL) AS sent,
                       bool_or(coalesce(m.opened_at, m.clicked_at) IS NOT NULL) AS opened,
                       bool_or(m.clicked_at IS NOT NULL) AS clicked
                FROM messages m
                WHERE m.journey_id = :journey AND m.enrollment_id IS NOT NULL {version_filter}
                GROUP BY m.enrollment_id
            ) per_enrollment
            """
        ),
        {"journey": journey_id, "version": version},
    )
    got, opened, clicked = result.one()
    return int(got), int(opened), int(clicked)
