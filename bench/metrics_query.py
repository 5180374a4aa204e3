"""Journey metrics on PostgreSQL at 1,000,000 messages (default 200,000; --messages N).

Loads one journey (two versions, an A/B split, four email steps) with N messages, N/4
enrollments (one in ten converted by a purchase event carrying a value) and one contact per
enrollment, set-based (``generate_series``), plus a second journey with a tenth as many
messages, then times, best of several runs:

- the baseline: ``SELECT count(*) FROM messages WHERE journey_id = ...``, the least any
  per-journey figure costs;
- the message metrics of the journey (totals, per version, step and variant: one
  ``GROUPING SETS`` scan), the enrollment metrics (conversions, median time to convert,
  revenue from the goal events), and the whole report ``GET /v1/journeys/{key}/metrics``
  serves (both), and the dashboard's funnel (enrollments that got, opened, clicked a
  message).

The ratios to the baseline are the headline (the machine is shared; absolute times are
noisy). Usage: ``.venv/bin/python -m bench.metrics_query [--messages 1000000]``; uses the
server ``DATABASE_URL`` names (a scratch database, dropped after) or an embedded PostgreSQL.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from api.analytics import (
    EnrollmentFilter,
    MessageFilter,
    enrollment_metrics,
    journey_funnel,
    journey_report,
    message_metrics,
)
from bench.stack import scratch_database
from models.db import get_engine, session_scope

RESULTS = Path(__file__).resolve().parent / "results"
STEPS = 4

LOAD = [
    """
    INSERT INTO journeys (id, key, name, status, draft, current_version, created_at, updated_at)
    VALUES (:journey, 'bench-journey', 'Bench journey', 'active', '{}', 2, now(), now()),
           (:other, 'bench-other', 'Other journey', 'active', '{}', 1, now(), now())
    """,
    """
    INSERT INTO journey_versions (id, journey_id, version, document, published_at)
    VALUES (:v1, :journey, 1, '{}', now()), (:v2, :journey, 2, '{}', now()),
           (:ov, :other, 1, '{}', now())
    """,
    # One contact per enrollment; enrollment n of the journey, or of the other journey
    # for n > :enrollments.
    """
    INSERT INTO contacts (id, email, attributes, tags, lifecycle_stage, score, email_status,
                          sms_status, created_at, updated_at)
    SELECT md5('c' || g)::uuid, 'c' || g || '@bench.test', '{}', '{}', 'subscriber', 0,
           'subscribed', 'subscribed', now(), now()
    FROM generate_series(1, :all_enrollments) g
    """,
    """
    INSERT INTO enrollments (id, journey_id, journey_version_id, contact_id, run_key,
                             workflow_id, status, variant, goal, started_at, ended_at)
    SELECT md5('e' || g)::uuid,
           CASE WHEN g <= :enrollments THEN CAST(:journey AS uuid) ELSE CAST(:other AS uuid) END,
           CASE WHEN g > :enrollments THEN CAST(:ov AS uuid)
                WHEN g % 3 = 0 THEN CAST(:v1 AS uuid) ELSE CAST(:v2 AS uuid) END,
           md5('c' || g)::uuid, '', 'journey/bench/contact/' || g,
           CASE WHEN g % 10 = 0 THEN 'exited' WHEN g % 10 < 4 THEN 'active' ELSE 'completed' END,
           CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END,
           CASE WHEN g % 10 = 0 THEN 'exit_when met by event purchase_completed' END,
           now() - interval '30 days' + (g % 1000) * interval '1 minute',
           CASE WHEN g % 10 >= 4 OR g % 10 = 0
                THEN now() - interval '20 days' + (g % 997) * interval '1 minute' END
    FROM generate_series(1, :all_enrollments) g
    """,
    """
    INSERT INTO events (id, idempotency_id, contact_id, name, properties, occurred_at,
                        received_at, source)
    SELECT md5('p' || g)::uuid, 'purchase-' || g, md5('c' || g)::uuid, 'purchase_completed',
           jsonb_build_object('value', 10 + g % 90), now() - interval '21 days',
           now() - interval '21 days', 'api'
    FROM generate_series(10, :all_enrollments, 10) g
    """,
    # STEPS messages per enrollment, with opens, clicks, bounces, complaints, unsubscribes.
    """
    INSERT INTO messages (id, idempotency_key, contact_id, enrollment_id, journey_id, step_id,
                          variant, journey_version, channel, template_key, provider, status,
                          created_at, sent_at, delivered_at, opened_at, clicked_at, bounced_at,
                          complained_at, unsubscribed_at)
    SELECT gen_random_uuid(), 'm:' || g || ':' || s, md5('c' || g)::uuid, md5('e' || g)::uuid,
           CASE WHEN g <= :enrollments THEN CAST(:journey AS uuid) ELSE CAST(:other AS uuid) END,
           'step-' || s, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END,
           CASE WHEN g > :enrollments THEN 1 WHEN g % 3 = 0 THEN 1 ELSE 2 END, 'email', 'tpl-' || s,
           'outbox', CASE WHEN (g + s) % 50 = 0 THEN 'bounced' ELSE 'sent' END,
           now() - interval '25 days', now() - interval '25 days',
           CASE WHEN (g + s) % 50 <> 0 THEN now() - interval '25 days' END,
           CASE WHEN (g + s) % 3 = 0 THEN now() - interval '24 days' END,
           CASE WHEN (g + s) % 7 = 0 THEN now() - interval '24 days' END,
           CASE WHEN (g + s) % 50 = 0 THEN now() - interval '25 days' END,
           CASE WHEN (g + s) % 997 = 0 THEN now() - interval '24 days' END,
           CASE WHEN (g + s) % 251 = 0 THEN now() - interval '24 days' END
    FROM generate_series(1, :all_enrollments) g, generate_series(1, :steps) s
    """,
]


async def best_of(runs: int, action: Callable[[], Awaitable[Any]]) -> tuple[float, Any]:
    best, result = float("inf"), None
    for _ in range(runs):
        started = time.perf_counter()
        result = await action()
        best = min(best, time.perf_counter() - started)
    return best * 1000, result


async def run(database_url: str, messages: int, runs: int, load: bool = True) -> dict[str, Any]:
    enrollments = messages // STEPS
    ids = {name: uuid.uuid4() for name in ("journey", "other", "v1", "v2", "ov")}
    if not load:
        async with session_scope(database_url) as session:
            found = await (await session.connection()).execute(
                sa.text("SELECT id FROM journeys WHERE key = 'bench-journey'")
            )
            ids["journey"] = found.scalar_one()
    params = {
        **ids,
        "enrollments": enrollments,
        "all_enrollments": enrollments + enrollments // 10,
        "steps": STEPS,
    }
    started = time.perf_counter()
    async with session_scope(database_url) as session:
        connection = await session.connection()
        for statement in LOAD if load else []:
            await connection.execute(sa.text(statement), params)
        await session.commit()
        await (await session.connection()).execute(sa.text("ANALYZE"))
        await session.commit()
    load_seconds = time.perf_counter() - started
    journey = ids["journey"]
    report: dict[str, Any] = {"messages": messages, "load_seconds": round(load_seconds, 1)}
    async with session_scope(database_url) as session:
        connection = await session.connection()

        async def baseline() -> int:
            result = await connection.execute(
                sa.text("SELECT count(*) FROM messages WHERE journey_id = :j"), {"j": journey}
            )
            return int(result.scalar_one())

        async def messages_by_dimension() -> Any:
            return await message_metrics(
                session, MessageFilter(journey_id=journey), ("version", "step", "variant")
            )

        async def messages_totals() -> Any:
            return await message_metrics(session, MessageFilter(journey_id=journey))

        async def enrollment_outcomes() -> Any:
            return await enrollment_metrics(
                session, EnrollmentFilter(journey_id=journey), ("version", "variant")
            )

        async def whole_report() -> Any:
            return await journey_report(session, journey)

        async def funnel() -> Any:
            return await journey_funnel(session, journey)

        base_ms, counted = await best_of(runs, baseline)
        report["journey_messages"] = counted
        report["baseline_count_ms"] = round(base_ms, 1)
        for name, action in (
            ("message_totals", messages_totals),
            ("message_metrics_by_version_step_variant", messages_by_dimension),
            ("enrollment_metrics_by_version_variant", enrollment_outcomes),
            ("journey_report", whole_report),
            ("journey_funnel", funnel),
        ):
            ms, result = await best_of(runs, action)
            report[name] = {"ms": round(ms, 1), "vs_count": round(ms / base_ms, 2)}
            if name == "journey_report":
                report["check"] = {
                    "sent": result["messages"]["sent"],
                    "enrolled": result["enrollments"]["enrolled"],
                    "conversions": result["enrollments"]["conversions"],
                    "revenue": result["enrollments"]["revenue"],
                }
    assert report["check"]["sent"] == messages, report["check"]
    return report


def print_table(report: dict[str, Any]) -> None:
    check = report["check"]
    print(
        f"\n{report['journey_messages']:,} messages of one journey (+10% in another), "
        f"{check['enrolled']:,} enrollments, {check['conversions']:,} conversions; "
        f"loaded in {report['load_seconds']} s\n"
    )
    print(f"{'query':<42}{'ms':>10}{'x count(*)':>12}")
    print(
        f"{'baseline: count(*) of the journey':<42}{report['baseline_count_ms']:>10.1f}{1:>12.2f}"
    )
    for name in (
        "message_totals",
        "message_metrics_by_version_step_variant",
        "enrollment_metrics_by_version_variant",
        "journey_report",
        "journey_funnel",
    ):
        row = report[name]
        print(f"{name:<42}{row['ms']:>10.1f}{row['vs_count']:>12.2f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=5, help="timed runs per figure (best kept)")
    parser.add_argument(
        "--keep", action="store_true", help="keep the scratch database (to EXPLAIN queries)"
    )
    parser.add_argument("--database", help="time the queries on a database --keep kept")
    args = parser.parse_args()
    if args.database:
        report = await run(args.database, args.messages, args.runs, load=False)
        await get_engine(args.database).dispose()
        print_table(report)
        return
    async with scratch_database(keep=args.keep) as database_url:
        report = await run(database_url, args.messages, args.runs)
    print_table(report)
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"metrics_query_{args.messages}.json"
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    asyncio.run(main())
