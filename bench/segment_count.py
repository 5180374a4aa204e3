"""Segment counting and listing on PostgreSQL, at 100,000 contacts (or more, by flag).

Loads N synthetic contacts with three events each into a scratch database, defines four
segments (profile, behaviour in a window, a segment of a segment with a score, and
inactivity), and times, best of several runs:

- computing membership from scratch (every member entering: one event each), and the
  scheduled refresh of every contact once membership is current;
- counting a segment (``GET /v1/segments/{key}``: the ``segment_members`` index);
- counting the condition live (``POST /v1/segments/preview``: the compiled SQL), beside a
  hand-written SQL query for the same question: the ratio is the headline, since the
  machine is shared and absolute times are noisy;
- listing the first page of 100 members.

Usage: ``.venv/bin/python -m bench.segment_count [--contacts 1000000]``. Uses the server
``DATABASE_URL`` names (a scratch database, dropped after) or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlmodel import col, func, select

from activities.audience import CONDITION, refresh_audience
from bench.stack import scratch_database
from models.conditions_sql import compile_condition
from models.db import session_scope
from models.tables import Contact, Segment, SegmentMember, utcnow

RESULTS = Path(__file__).resolve().parent / "results"

SEGMENTS: dict[str, tuple[dict[str, Any], str]] = {
    "pro-plan": (
        {"attr": "plan", "value": "pro"},
        "SELECT count(*) FROM contacts WHERE attributes->>'plan' = 'pro'",
    ),
    "recent-buyers": (
        {"event": "purchase", "within": "30d"},
        "SELECT count(*) FROM contacts c WHERE EXISTS (SELECT 1 FROM events e "
        "WHERE e.contact_id = c.id AND e.name = 'purchase' "
        "AND e.occurred_at >= now() - interval '30 days')",
    ),
    "engaged-pros": (
        {"all": [{"segment": "pro-plan"}, {"score_gte": 50}]},
        "SELECT count(*) FROM contacts WHERE attributes->>'plan' = 'pro' AND score >= 50",
    ),
    "dormant": (
        {"not": {"event": "page_viewed", "within": "30d"}},
        "SELECT count(*) FROM contacts c WHERE NOT EXISTS (SELECT 1 FROM events e "
        "WHERE e.contact_id = c.id AND e.name = 'page_viewed' "
        "AND e.occurred_at >= now() - interval '30 days')",
    ),
}

LOAD_CONTACTS = """
INSERT INTO contacts (id, email, attributes, lifecycle_stage, score, score_adjustment, tags,
                      email_status, sms_status, created_at, updated_at)
SELECT gen_random_uuid(), 'c' || g || '@bench.example',
       jsonb_build_object('plan', (ARRAY['free', 'pro', 'team'])[1 + g % 3],
                          'seats', g % 50, 'country', (ARRAY['US', 'DE', 'FR', 'GB'])[1 + g % 4]),
       'subscriber', g % 100, g % 100, ARRAY['t' || (g % 10)], 'subscribed', 'subscribed',
       now(), now()
FROM generate_series(1, :n) AS g
"""
LOAD_EVENTS = """
INSERT INTO events (id, idempotency_id, contact_id, name, properties, occurred_at,
                    received_at, source, delivered_at)
SELECT gen_random_uuid(), gen_random_uuid()::text, c.id,
       (ARRAY['page_viewed', 'email_opened', 'purchase'])[1 + k],
       '{}'::jsonb, now() - random() * interval '60 days', now(), 'api', now()
FROM contacts c, generate_series(0, 2) AS k
"""


async def best_of(runs: int, action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(runs):
        started = time.perf_counter()
        result = await action()
        times.append(time.perf_counter() - started)
    return min(times), result


async def run(database_url: str, contacts: int, runs: int) -> dict[str, Any]:
    async with session_scope(database_url) as session:
        connection = await session.connection()
        started = time.perf_counter()
        await connection.execute(sa.text(LOAD_CONTACTS), {"n": contacts})
        await connection.execute(sa.text(LOAD_EVENTS))
        load_seconds = time.perf_counter() - started
    async with session_scope(database_url) as session:
        await (await session.connection()).execute(sa.text("ANALYZE"))
        for key, (condition, _) in SEGMENTS.items():
            session.add(Segment(key=key, name=key, condition=condition))
    async with session_scope(database_url) as session:
        refresh_seconds, changes = await best_of(
            1, lambda: refresh_audience(session, now=utcnow(), contact_ids=None)
        )
    async with session_scope(database_url) as session:
        steady_seconds, _ = await best_of(
            1, lambda: refresh_audience(session, now=utcnow(), contact_ids=None)
        )
    report: dict[str, Any] = {
        "contacts": contacts,
        "events": contacts * 3,
        "load_seconds": round(load_seconds, 2),
        "full_refresh_seconds": round(refresh_seconds, 3),
        "steady_refresh_seconds": round(steady_seconds, 3),
        "members_entered": changes.segments_entered,
        "segments": {},
    }
    contacts_table: Any = Contact.__table__  # type: ignore[attr-defined]
    async with session_scope(database_url) as session:
        await (await session.connection()).execute(sa.text("ANALYZE"))
        for key, (condition, hand_written) in SEGMENTS.items():
            segment = (await session.exec(select(Segment).where(Segment.key == key))).one()

            async def stored_count(segment_id: uuid.UUID = segment.id) -> int:
                return (
                    await session.exec(
                        select(func.count()).where(SegmentMember.segment_id == segment_id)
                    )
                ).one()

            async def live_count(condition: dict[str, Any] = condition) -> int:
                where = compile_condition(CONDITION.validate_python(condition), now=utcnow())
                query = (
                    sa.select(sa.func.count())
                    .select_from(contacts_table)
                    .where(
                        contacts_table.c.erased_at.is_(None),
                        contacts_table.c.merged_into.is_(None),
                        where,
                    )
                )
                return int((await (await session.connection()).execute(query)).scalar_one())

            async def baseline(sql: str = hand_written) -> int:
                return int((await (await session.connection()).execute(sa.text(sql))).scalar_one())

            async def first_page(segment_id: uuid.UUID = segment.id) -> int:
                rows = await session.exec(
                    select(SegmentMember.contact_id, Contact.email)
                    .join(Contact, Contact.id == SegmentMember.contact_id)  # type: ignore[arg-type]
                    .where(SegmentMember.segment_id == segment_id)
                    .order_by(col(SegmentMember.contact_id))
                    .limit(100)
                )
                return len(rows.all())

            stored_s, members = await best_of(runs, stored_count)
            live_s, live = await best_of(runs, live_count)
            base_s, expected = await best_of(runs, baseline)
            page_s, _ = await best_of(runs, first_page)
            assert live == expected, (key, live, expected)
            # Windowed segments drift as events age past the window between the refresh
            # and the live count; the others must match the stored membership exactly.
            drift = contacts // 1000 if "within" in json.dumps(condition) else 0
            assert abs(members - live) <= drift, (key, members, live)
            report["segments"][key] = {
                "members": members,
                "count_ms": round(stored_s * 1000, 2),
                "live_count_ms": round(live_s * 1000, 2),
                "hand_written_sql_ms": round(base_s * 1000, 2),
                "live_vs_hand_written": round(live_s / base_s, 2),
                "first_page_ms": round(page_s * 1000, 2),
            }
    return report


def print_table(report: dict[str, Any]) -> None:
    print(
        f"\n{report['contacts']:,} contacts, {report['events']:,} events; "
        f"membership of 4 segments computed from scratch in {report['full_refresh_seconds']:.2f} s "
        f"(every member entering is an event), refreshed again in "
        f"{report['steady_refresh_seconds']:.2f} s\n"
    )
    header = ("segment", "members", "count ms", "live ms", "hand SQL ms", "live/hand", "page ms")
    print("{:<15}{:>9}{:>10}{:>10}{:>13}{:>11}{:>9}".format(*header))
    for key, row in report["segments"].items():
        print(
            f"{key:<15}{row['members']:>9,}{row['count_ms']:>10.1f}{row['live_count_ms']:>10.1f}"
            f"{row['hand_written_sql_ms']:>13.1f}{row['live_vs_hand_written']:>11.2f}"
            f"{row['first_page_ms']:>9.1f}"
        )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contacts", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (best kept)")
    args = parser.parse_args()
    async with scratch_database() as database_url:
        report = await run(database_url, args.contacts, args.runs)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"segment_count_{args.contacts}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(
        f"\nwrote {out}; median live/hand ratio "
        f"{statistics.median(r['live_vs_hand_written'] for r in report['segments'].values())}"
    )


if __name__ == "__main__":
    asyncio.run(main())
