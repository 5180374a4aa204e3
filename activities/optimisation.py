"""Choices made from engagement history: the best send time, the best channel, A/B winners.

The rules, stated once (README "Send-time, channel and A/B optimisation" says the same):

* **best_time**: the contact's ``email_opened`` and ``email_clicked`` events (SendGrid
  machine opens excluded) within the journey's ``send_time.lookback`` (default 90 days)
  before the workflow's now, counted by hour of the week in the contact's local zone
  (PostgreSQL's ``AT TIME ZONE``, so DST is the zone's). With at least
  ``send_time.min_engagements`` (default 3) the hour with the most wins; a tie goes to the
  earliest hour of the week (Monday 00:00 first). Fewer: the journey's default time.
* **channel: best**: among the step's channels the contact can receive (an address,
  subscribed, not suppressed), the one with more engagement events in the same lookback:
  email counts ``email_opened`` + ``email_clicked``, SMS counts ``sms_received`` (replies)
  + ``sms_clicked``. A tie (none at all included) keeps the step's own channel; so does a
  contact who can receive neither (the send then records why it was skipped).
* **A/B winner**: contacts are split by the step's weights (deterministic per
  enrollment) and recorded with the workflow's time. A contact counts as *observed* once
  ``observe`` (default 1 day) has passed since it entered the split, and as a *success*
  when the metric's event came within that time: ``open`` = ``email_opened`` or
  ``email_clicked``, ``click`` = ``email_clicked``, ``conversion`` = the journey's
  ``exit_when`` events. When every variant has ``test_size`` observed contacts, a
  Pearson chi-square test of homogeneity (two variants: the same p-value as the two-sided
  pooled two-proportion z-test) is run once over all observed contacts: p below
  ``1 - confidence`` names the variant with the highest rate the winner, and every later
  contact goes to it; otherwise the test ends with no difference and the weights stay.
  One test, at a fixed size: looking again and again would inflate false winners.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text
from sqlalchemy.dialects.postgresql import insert
from sqlmodel import col, select, update
from temporalio import activity

from models.contracts import (
    AssignSplitInput,
    AssignSplitResult,
    ChooseChannelInput,
    ChooseChannelResult,
    SendTimeInput,
    SendTimeResult,
)
from models.db import session_scope
from models.durations import format_duration
from models.tables import (
    Contact,
    Enrollment,
    SplitAssignment,
    SplitTest,
    SplitTestStatus,
    SubscriptionStatus,
    Suppression,
    hashed_address,
)
from settings import Settings

OPEN_EVENTS = ("email_opened", "email_clicked")
CHANNEL_EVENTS = {
    "email": ("email_opened", "email_clicked"),
    "sms": ("sms_received", "sms_clicked"),
}
CHANNEL_WORDS = {"email": "opens/clicks", "sms": "replies/clicks"}

_HISTOGRAM = text(
    """
    SELECT (extract(isodow FROM occurred_at AT TIME ZONE :zone))::int - 1 AS weekday,
           (extract(hour FROM occurred_at AT TIME ZONE :zone))::int AS hour,
           count(*) AS engagements
    FROM events
    WHERE contact_id = :contact
      AND name = ANY(:names)
      AND occurred_at > :since AND occurred_at <= :now
      AND (properties ->> 'sg_machine_open') IS DISTINCT FROM 'true'
    GROUP BY 1, 2
    """
)

_CHANNEL_COUNTS = text(
    """
    SELECT name, count(*) FROM events
    WHERE contact_id = :contact AND name = ANY(:names)
      AND occurred_at > :since AND occurred_at <= :now
    GROUP BY name
    """
)

# Per variant: contacts whose observation time is over, and those with a success in it.
_SPLIT_STATS = text(
    """
    SELECT a.variant,
           count(*) AS observed,
           count(*) FILTER (WHERE EXISTS (
               SELECT 1 FROM events e
               WHERE e.contact_id = a.contact_id AND e.name = ANY(:names)
                 AND e.occurred_at >= a.assigned_at
                 AND e.occurred_at <= a.assigned_at + :observe)) AS successes
    FROM split_assignments a
    WHERE a.split_test_id = :test AND a.assigned_at + :observe <= :now
    GROUP BY a.variant
    """
)


_OBSERVED = text(
    """
    SELECT variant, count(*) FROM split_assignments
    WHERE split_test_id = :test AND assigned_at + :observe <= :now
    GROUP BY variant
    """
)


def best_hour(histogram: Sequence[tuple[int, int, int]], min_engagements: int) -> SendTimeResult:
    """The hour of the week with the most engagements (ties: earliest in the week)."""
    total = sum(count for _, _, count in histogram)
    if total < min_engagements or not histogram:
        return SendTimeResult(engagements=total)
    weekday, hour, count = min(histogram, key=lambda row: (-row[2], row[0], row[1]))
    return SendTimeResult(engagements=total, weekday=weekday, hour=hour, count=count)


def chi_square_sf(statistic: float, df: int) -> float:
    """P(X >= statistic) for a chi-square distribution with integer ``df`` (closed forms)."""
    if df < 1:
        raise ValueError("df must be at least 1")
    if statistic <= 0:
        return 1.0
    half = statistic / 2
    if df % 2 == 0:
        term = total = math.exp(-half)
        for i in range(1, df // 2):
            term *= half / i
            total += term
        return min(1.0, total)
    root = math.sqrt(statistic)
    total = math.erfc(root / math.sqrt(2))
    term = root  # x^(r - 1/2) / (1 * 3 * ... * (2r - 1)), r = 1
    series = 0.0
    for r in range(1, (df - 1) // 2 + 1):
        series += term
        term *= statistic / (2 * r + 1)
    total += math.sqrt(2 / math.pi) * math.exp(-half) * series
    return min(1.0, total)


def homogeneity_p_value(observed: Sequence[int], successes: Sequence[int]) -> float:
    """Pearson chi-square test that every variant has the same success rate (k x 2 table)."""
    n = sum(observed)
    hits = sum(successes)
    if n == 0 or hits == 0 or hits == n:
        return 1.0  # every contact alike: no difference can show
    rate = hits / n
    statistic = 0.0
    for size, won in zip(observed, successes, strict=True):
        expected_hits, expected_misses = size * rate, size * (1 - rate)
        statistic += (won - expected_hits) ** 2 / expected_hits
        statistic += (size - won - expected_misses) ** 2 / expected_misses
    return chi_square_sf(statistic, len(observed) - 1)


def decide_split(
    variants: Sequence[str],
    stats: dict[str, tuple[int, int]],
    test_size: int,
    confidence: float,
) -> tuple[SplitTestStatus, str | None, float | None]:
    """(status, winner, p-value) once every variant has ``test_size`` observed contacts."""
    if any(stats.get(v, (0, 0))[0] < test_size for v in variants):
        return SplitTestStatus.testing, None, None
    observed = [stats[v][0] for v in variants]
    successes = [stats[v][1] for v in variants]
    p_value = homogeneity_p_value(observed, successes)
    if p_value >= 1 - confidence:
        return SplitTestStatus.no_difference, None, p_value
    # Highest rate; a tie goes to the variant declared first.
    winner = max(variants, key=lambda v: (stats[v][1] / stats[v][0], -variants.index(v)))
    return SplitTestStatus.winner, winner, p_value


def _hour_words(weekday: int, hour: int) -> str:
    day = ("Mondays", "Tuesdays", "Wednesdays", "Thursdays", "Fridays", "Saturdays", "Sundays")
    return f"{day[weekday]} {hour:02d}:00-{(hour + 1) % 24:02d}:00"


def lookback_words(lookback: timedelta) -> str:
    """``90 days`` rather than ``12 weeks 6 days``."""
    if lookback % timedelta(days=1) == timedelta(0):
        return f"{lookback.days} day{'s' if lookback.days != 1 else ''}"
    return format_duration(lookback)


def send_time_reason(result: SendTimeResult, zone: str, lookback: timedelta) -> str:
    lookback_text = lookback_words(lookback)
    if result.weekday is None or result.hour is None:
        return f"only {result.engagements} opens/clicks in {lookback_text}"
    times = "time" if result.count == 1 else "times"
    return (
        f"opened/clicked {result.count} {times} on {_hour_words(result.weekday, result.hour)} "
        f"({zone}), {result.engagements} in {lookback_text}"
    )


class OptimisationActivities:
    def __init__(self, settings: Settings) -> None:
        self.database_url = settings.database_url

    @activity.defn(name="choose_send_time")
    async def choose_send_time(self, input: SendTimeInput) -> SendTimeResult:
        now = datetime.fromisoformat(input.now)
        async with session_scope(self.database_url) as session:
            rows = (
                await (await session.connection()).execute(
                    _HISTOGRAM,
                    {
                        "zone": input.timezone,
                        "contact": uuid.UUID(input.contact_id),
                        "names": list(OPEN_EVENTS),
                        "since": now - timedelta(seconds=input.lookback_seconds),
                        "now": now,
                    },
                )
            ).all()
        return best_hour([(r[0], r[1], r[2]) for r in rows], input.min_engagements)

    @activity.defn(name="choose_channel")
    async def choose_channel(self, input: ChooseChannelInput) -> ChooseChannelResult:
        now = datetime.fromisoformat(input.now)
        async with session_scope(self.database_url) as session:
            contact = await session.get(Contact, uuid.UUID(input.contact_id))
            blocked: dict[str, str] = {}
            for channel in input.channels:
                reason = await _cannot_receive(session, contact, channel)
                if reason:
                    blocked[channel] = reason
            names = [name for channel in input.channels for name in CHANNEL_EVENTS[channel]]
            rows = (
                await (await session.connection()).execute(
                    _CHANNEL_COUNTS,
                    {
                        "contact": uuid.UUID(input.contact_id),
                        "names": names,
                        "since": now - timedelta(seconds=input.lookback_seconds),
                        "now": now,
                    },
                )
            ).all()
        counts = dict.fromkeys(input.channels, 0)
        for name, count in rows:
            for channel in input.channels:
                if name in CHANNEL_EVENTS[channel]:
                    counts[channel] += count
        open_to = [c for c in input.channels if c not in blocked]
        days = lookback_words(timedelta(seconds=input.lookback_seconds))
        tally = ", ".join(f"{counts[c]} {c} {CHANNEL_WORDS[c]}" for c in input.channels)
        if not open_to:
            why = "; ".join(blocked.values())
            return ChooseChannelResult(
                input.declared, f"the step's own channel: the contact can receive neither ({why})"
            )
        if len(open_to) == 1:
            only = open_to[0]
            why = "; ".join(blocked.values())
            return ChooseChannelResult(only, f"the only channel the contact can receive ({why})")
        top = max(counts[c] for c in open_to)
        if sum(counts[c] == top for c in open_to) > 1:
            return ChooseChannelResult(
                input.declared, f"the step's own channel: a tie ({tally} in {days})"
            )
        best = next(c for c in open_to if counts[c] == top)
        return ChooseChannelResult(best, f"more engagement there ({tally} in {days})")

    @activity.defn(name="assign_split_variant")
    async def assign_split_variant(self, input: AssignSplitInput) -> AssignSplitResult:
        """Record the contact in the split's test and decide the winner when the test is
        due; one decision for the whole journey. The test row is locked only once the test
        is due, so arrivals do not queue behind each other the rest of the time."""
        now = datetime.fromisoformat(input.now)
        observe = timedelta(seconds=input.observe_seconds)
        enrollment_id = uuid.UUID(input.enrollment_id)
        async with session_scope(self.database_url) as session:
            connection = await session.connection()
            await connection.execute(
                insert(SplitTest)
                .values(
                    id=uuid.uuid4(),
                    journey_key=input.journey_key,
                    step_id=input.step_id,
                    metric=input.metric,
                    status=SplitTestStatus.testing,
                    stats={},
                    created_at=now,
                )
                .on_conflict_do_nothing(index_elements=["journey_key", "step_id"])
            )
            which = (
                select(SplitTest)
                .where(SplitTest.journey_key == input.journey_key)
                .where(SplitTest.step_id == input.step_id)
            )
            test = (await session.exec(which)).one()
            earlier = (
                await session.exec(
                    select(SplitAssignment.variant)
                    .where(SplitAssignment.split_test_id == test.id)
                    .where(SplitAssignment.enrollment_id == enrollment_id)
                )
            ).first()
            if earlier is not None:  # a retry: the same answer
                return AssignSplitResult(earlier, "assigned earlier in this test", test.status)
            if test.status == SplitTestStatus.testing and await self._due(
                session, test, input, now, observe
            ):
                # Whoever holds the lock first decides; the others then see its decision.
                test = (
                    await session.exec(
                        which.with_for_update().execution_options(populate_existing=True)
                    )
                ).one()
                if test.status == SplitTestStatus.testing:
                    await self._decide(session, test, input, now, observe)
            variant = input.proposed
            if test.status == SplitTestStatus.winner and test.winner in input.variants:
                variant = test.winner
            await connection.execute(
                insert(SplitAssignment).values(
                    split_test_id=test.id,
                    enrollment_id=enrollment_id,
                    contact_id=uuid.UUID(input.contact_id),
                    variant=variant,
                    assigned_at=now,
                )
            )
            await connection.execute(
                update(Enrollment)
                .where(col(Enrollment.id) == enrollment_id)
                .values(variant=variant)
            )
            return AssignSplitResult(variant, _split_reason(test, variant), test.status)

    async def _due(
        self,
        session: Any,
        test: SplitTest,
        input: AssignSplitInput,
        now: datetime,
        observe: timedelta,
    ) -> bool:
        """Whether every variant has ``test_size`` observed contacts."""
        rows = (
            await (await session.connection()).execute(
                _OBSERVED, {"observe": observe, "test": test.id, "now": now}
            )
        ).all()
        observed = {variant: int(count) for variant, count in rows}
        return all(observed.get(v, 0) >= input.test_size for v in input.variants)

    async def _decide(
        self,
        session: Any,
        test: SplitTest,
        input: AssignSplitInput,
        now: datetime,
        observe: timedelta,
    ) -> None:
        rows = (
            await (await session.connection()).execute(
                _SPLIT_STATS,
                {"names": input.success_events, "observe": observe, "test": test.id, "now": now},
            )
        ).all()
        stats = {variant: (int(observed), int(won)) for variant, observed, won in rows}
        status, winner, p_value = decide_split(
            input.variants, stats, input.test_size, input.confidence
        )
        if status == SplitTestStatus.testing:
            return
        test.status, test.winner, test.p_value, test.decided_at = status, winner, p_value, now
        test.stats = {
            v: {
                "observed": stats[v][0],
                "successes": stats[v][1],
                "rate": stats[v][1] / stats[v][0],
            }
            for v in input.variants
        }
        session.add(test)
        await session.flush()


def _split_reason(test: SplitTest, variant: str) -> str:
    if test.status == SplitTestStatus.winner:
        return f"winner of the {test.metric} test (p = {test.p_value:.4g})"
    if test.status == SplitTestStatus.no_difference:
        return f"by weight: the {test.metric} test found no difference (p = {test.p_value:.4g})"
    return f"by weight while the {test.metric} test runs"


async def _cannot_receive(session: Any, contact: Contact | None, channel: str) -> str | None:
    """Why the contact cannot get a message on ``channel`` now (None: it can)."""
    if contact is None or contact.erased_at is not None:
        return "contact erased"
    address = contact.email if channel == "email" else contact.phone
    if not address:
        return f"no {'email address' if channel == 'email' else 'phone'}"
    status = contact.email_status if channel == "email" else contact.sms_status
    if status != SubscriptionStatus.subscribed:
        return f"{channel} {status}"
    suppressed = (
        await session.exec(
            select(Suppression.reason)
            .where(col(Suppression.channel) == channel)
            .where(col(Suppression.address).in_([address, hashed_address(address)]))
        )
    ).first()
    if suppressed is not None:
        return f"{channel} address suppressed ({suppressed})"
    return None
